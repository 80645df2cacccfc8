"""A GGUF model's fast decoder is saved beside its conversion and read back by later
loads (no transformers weights read, nothing repacked), with the same answers; a
pack that is stale, unreadable or not the model's own is never used."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from chatforge import ChatSession, GenerationConfig, load_model
from chatforge.models.export import export_model
from chatforge.models.fast import packed
from chatforge.models.fast.gguf_weights import BlockEmbedding


@pytest.fixture(scope="module")
def ggufs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("packed")
    return {
        q: export_model(str(tiny_llama_dir), out / f"{q}.gguf", quantize=q)
        for q in ("q8_0", "q4_0")
    }


def _packs(lm) -> list[Path]:
    return sorted(lm.info.path.glob("fast-*.safetensors"))


def _greedy(lm) -> str:
    cfg = GenerationConfig(temperature=0, max_new_tokens=12)
    return ChatSession(lm, cfg).send("hello there, how are you?").text


def _fresh(lm) -> None:
    for p in _packs(lm):
        p.unlink()


@pytest.fixture()
def reads(monkeypatch) -> list[Path]:
    """The directories whose transformers weights loads read."""
    from chatforge.models import loading

    seen: list[Path] = []
    real = loading.load_transformers

    def spy(directory, *args, **kwargs):
        seen.append(directory)
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(loading, "load_transformers", spy)
    return seen


@pytest.mark.parametrize("q", ["q8_0", "q4_0"])
def test_the_decoder_is_saved_once_and_read_back(ggufs, q, reads):
    first = load_model(str(ggufs[q]))
    _fresh(first)
    reads.clear()
    built = load_model(str(ggufs[q]))  # builds from transformers' copy and the file
    assert reads == [built.info.path]
    (pack,) = _packs(built)
    assert pack.name.startswith("fast-gguf-fp32-")
    # As readable as the conversion's other files (safetensors writes 0600 files).
    assert pack.stat().st_mode & 0o777 == (built.info.path / "config.json").stat().st_mode & 0o777
    again = load_model(str(ggufs[q]))
    assert reads == [built.info.path]  # transformers' weights were not read again
    assert again.info.quantize == "gguf" and again.info.engine == "fast"
    for field in ("architecture", "n_params", "context_length", "prompt_format"):
        assert getattr(again.info, field) == getattr(built.info, field), field
    assert again.eos_token_id == built.eos_token_id
    assert isinstance(again.fast.embed, BlockEmbedding)
    a, b = built.fast.layers[1].up, again.fast.layers[1].up
    assert a.kind == b.kind == (8 if q == "q8_0" else 5)
    assert torch.equal(a.weight_q, b.weight_q) and torch.equal(a.scales, b.scales)
    assert again.fast.kernel_path == built.fast.kernel_path
    assert _greedy(again) == _greedy(built)
    assert again.model is not None  # transformers' model still loads where asked
    # `models list` counts the model's parameters, not the saved decoder's tensors.
    from chatforge.models.registry import _describe_dir

    assert _describe_dir(again.info.path)[0] == built.info.n_params


def test_an_unreadable_pack_is_removed_and_rebuilt(ggufs, caplog):
    lm = load_model(str(ggufs["q8_0"]))
    want = _greedy(lm)
    (pack,) = _packs(lm)
    pack.write_bytes(pack.read_bytes()[:1000])  # a crash mid-copy, a full disk
    with caplog.at_level(logging.WARNING, logger="chatforge.models.fast.packed"):
        again = load_model(str(ggufs["q8_0"]))
    assert "unreadable fast-decoder pack" in caplog.text
    assert _greedy(again) == want
    assert packed.load_pack(pack) is not None  # written again, whole


def test_a_pack_that_cannot_be_written_costs_nothing(ggufs, monkeypatch, caplog):
    lm = load_model(str(ggufs["q4_0"]))
    want = _greedy(lm)
    _fresh(lm)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("chatforge.models.fast.packed.save_file", full_disk, raising=False)
    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with caplog.at_level(logging.WARNING, logger="chatforge.models.fast.packed"):
        again = load_model(str(ggufs["q4_0"]))
    assert "No space left" in caplog.text
    assert _packs(again) == [] and _greedy(again) == want
    assert list(again.info.path.glob(".fast-*")) == []  # no temporary file left


def test_packs_are_named_by_settings_and_kernels(ggufs, monkeypatch, reads):
    lm = load_model(str(ggufs["q8_0"]), quantize="int8")
    assert lm.info.quantize == "int8"
    names = {p.name.split("-")[1] for p in _packs(lm)}
    assert "int8" in names  # the conversion's own int8 build, apart from the file's blocks
    d = lm.info.path
    assert packed.pack_path(d, "gguf", torch.float32) != packed.pack_path(d, "gguf", torch.bfloat16)
    # New kernels (a new layout): the old pack is not read; one for them is written.
    load_model(str(ggufs["q8_0"]))  # the file's blocks: packed now if not before
    reads.clear()
    monkeypatch.setattr("chatforge.models.fast.kernel_variants.source_hash", lambda _: "0" * 16)
    load_model(str(ggufs["q8_0"]))
    assert reads == [d]  # built again
    names = sorted(p.name for p in _packs(lm))
    assert [n for n in names if n.startswith("fast-gguf-fp32-")] == [
        f"fast-gguf-fp32-{'0' * 16}.safetensors"  # the stale one removed
    ]
    assert any(n.startswith("fast-int8-fp32-") for n in names)  # other settings kept


def test_without_our_kernels_a_pack_is_not_used(ggufs, monkeypatch, reads):
    lm = load_model(str(ggufs["q8_0"]))
    assert _packs(lm)
    reads.clear()
    monkeypatch.setattr("chatforge.models.fast.native.available", lambda: False)
    monkeypatch.setattr("chatforge.models.fast.native.kernels", lambda: None)
    torch_path = load_model(str(ggufs["q8_0"]))  # built again, on torch's kernels
    assert reads == [lm.info.path] and not torch_path.fast.layers[0].up.native
    assert _greedy(torch_path)  # runs (torch's int8 of the blocks: not bit-equal to ours)


def test_a_users_model_directory_is_not_packed(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir))
    assert lm.info.quantize == "int8" and _packs(lm) == []
