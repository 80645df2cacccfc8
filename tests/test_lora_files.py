"""A broken LoRA adapter is refused before any weights load, naming the file and what
is wrong with it, wherever an adapter is accepted (issue 22, item 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from chatforge import load_model
from chatforge.errors import ModelLoadError, ParamError
from chatforge.models.adapter_files import AdapterError, check_adapter_files
from cli_helpers import run
from lora_helpers import make_adapter


@pytest.fixture(autouse=True)
def _data(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def good(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora-files") / "good", seed=1)


def _truncated(d: Path) -> tuple[str, str]:
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return "adapter_model.safetensors", "truncated"


def _broken_config(d: Path) -> tuple[str, str]:
    c = d / "adapter_config.json"
    c.write_text(c.read_text()[:-20])  # cut short, as by a full disk
    return "adapter_config.json", "not valid JSON"


def _missing_weights(d: Path) -> tuple[str, str]:
    (d / "adapter_model.safetensors").unlink()
    return "adapter_model.safetensors", "no such file"


CORRUPTIONS = {"truncated": _truncated, "config": _broken_config, "missing": _missing_weights}


@pytest.fixture(params=list(CORRUPTIONS))
def broken(request, good, tmp_path) -> tuple[Path, str, str]:
    """A copy of the good adapter with one corruption: (dir, file name, problem)."""
    d = shutil.copytree(good, tmp_path / f"broken-{request.param}")
    name, problem = CORRUPTIONS[request.param](d)
    return d, name, problem


@pytest.fixture()
def no_weights_loaded(monkeypatch):
    """Fail the test if any model weights are read: the check must come first."""
    import chatforge.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the adapter was checked")

    monkeypatch.setattr(loading, "_weights", refuse)
    monkeypatch.setattr("chatforge.models.fast.packed.load_pack", refuse)


def _names(err: str, d: Path, name: str, problem: str) -> None:
    """``err`` names the file, and the problem outside the file's path."""
    assert str(d / name) in err and problem in err.replace(str(d), ""), err


def test_loading_a_broken_adapter_directory_names_the_file(broken, no_weights_loaded):
    d, name, problem = broken
    with pytest.raises(ModelLoadError) as e:
        load_model(str(d))
    _names(str(e.value), d, name, problem)
    assert "does not fit" not in str(e.value)


def test_engine_add_adapter_names_the_file(broken, tiny_llama_dir):
    from chatforge.generation.engine import Engine

    d, name, problem = broken
    eng = Engine.from_loaded(load_model(str(tiny_llama_dir), dtype="fp32", quantize="none"))
    with pytest.raises(AdapterError) as e:
        eng.add_adapter(d, "x")
    _names(str(e.value), d, name, problem)
    assert eng.adapters == []


def test_models_create_refuses_a_broken_adapter(broken, tiny_llama_dir, capsys):
    from chatforge.models.recipes import get_recipe, recipes_dir

    d, name, problem = broken
    argv = ["models", "create", "bad", "--from", str(tiny_llama_dir), "--adapter", str(d)]
    code, _, err = run(argv, capsys)
    assert code == 2
    _names(err.replace("\n", ""), d, name, problem)
    assert get_recipe("bad") is None and not list(recipes_dir().glob("*.json"))


def test_serve_adapter_is_checked_before_loading(broken, tiny_llama_dir):
    from chatforge.cli.serve import served_models

    d, name, problem = broken
    with pytest.raises(ParamError) as e:
        served_models([str(tiny_llama_dir)], [f"bot={d}"], "fp32", "none")
    _names(str(e.value), d, name, problem)


def test_post_adapters_names_the_file(good, tiny_llama_dir, tmp_path):
    from chatforge.server import ServedModel, create_app
    from serverkit import ServerThread, wait_until

    d = shutil.copytree(good, tmp_path / "adapter")
    name, problem = _truncated(d)
    model = ServedModel(
        "base", lambda: load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")
    )
    with ServerThread(create_app(models=[model])) as srv:
        assert wait_until(lambda: srv.state.started, 60)
        r = httpx.post(srv.url + "/v1/adapters", json={"name": "x", "path": str(d)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path"
        _names(r.json()["error"]["message"], d, name, problem)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda c: c.pop("peft_type"), "has no peft_type"),
        (lambda c: c.update(peft_type="IA3"), "only LoRA"),
        (lambda c: c.update(r=0), "positive integer"),
        (lambda c: c.update(r=8), "says r=8"),  # the tensors have rank 4
        (lambda c: c.update(lora_alpha="x"), "lora_alpha must be a number"),
        (lambda c: c.update(target_modules=3), "target_modules"),
        (lambda c: c.update(base_model_name_or_path=None), "names no base model"),
        (lambda c: c.update(base_model_name_or_path=["a"]), "must be a string"),
    ],
)
def test_config_fields_peft_needs(good, tmp_path, change, needle):
    d = shutil.copytree(good, tmp_path / "a")
    conf = json.loads((d / "adapter_config.json").read_text())
    change(conf)
    (d / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(AdapterError, match=needle) as e:
        check_adapter_files(d)
    assert "adapter_config.json" in str(e.value) or "adapter_model.safetensors" in str(e.value)


def test_weights_that_are_not_a_lora_adapters(good, tiny_llama_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    # a full model's weights file in the adapter's place
    d = shutil.copytree(good, tmp_path / "full")
    shutil.copy(tiny_llama_dir / "model.safetensors", d / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="is not a LoRA weight"):
        check_adapter_files(d)
    # lora_A without its lora_B
    d = shutil.copytree(good, tmp_path / "half")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({key: torch.zeros(4, 32)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="has no lora_B"):
        check_adapter_files(d)
    # not a safetensors file at all; bytes appended after the last tensor
    d = shutil.copytree(good, tmp_path / "junk")
    w = d / "adapter_model.safetensors"
    w.write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="not a safetensors file"):
        check_adapter_files(d)
    shutil.copy(good / "adapter_model.safetensors", w)
    w.write_bytes(w.read_bytes() + b"\0" * 16)
    with pytest.raises(AdapterError, match="16 bytes after its last tensor"):
        check_adapter_files(d)
    # a good adapter passes, with its recorded base
    files = check_adapter_files(good)
    assert files.base == str(tiny_llama_dir) and files.shapes
