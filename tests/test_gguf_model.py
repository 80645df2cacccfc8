"""A GGUF model's conversion keeps no fp32 copy of its weights: they stay in the file,
and transformers' model is built from it, the same model transformers' own GGUF
loader makes (issue: no fp32 expansion in the cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from chatforge import load_model
from chatforge.errors import ModelLoadError
from chatforge.models import gguf as cache
from chatforge.models import gguf_file
from chatforge.models.export import export_model
from chatforge.models.meta import ModelMeta
from chatforge.models.registry import _describe_dir


def _weight_files(directory: Path) -> list[str]:
    """Model weights in a directory (the fast decoder's saved packs are not)."""
    return sorted(p.name for p in directory.glob("*.safetensors") if not p.name.startswith("fast-"))


def _theirs(path: Path, directory: Path):
    """transformers' own reading of a GGUF file (dequantised, fp32), with the settings
    of its conversion ``directory`` (transformers reads a GPT-2's context length from
    the file into a setting its GPT-2 ignores: see gguf._gpt2_settings)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config
    ).eval()


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "arch,quantize",
    [("llama", "q4_0"), ("llama", "q8_0"), ("qwen2", "q8_0"), ("gpt2", "f16"), ("gpt2", "q8_0")],
)
def test_transformers_model_is_the_files_weights_with_no_copy_in_the_cache(
    arch, quantize, tmp_path, tiny_gpt2_dir
):
    from conftest import make_tiny_llama

    src = tiny_gpt2_dir if arch == "gpt2" else make_tiny_llama(tmp_path / arch, 3, arch=arch)
    out = export_model(str(src), tmp_path / "m.gguf", quantize=quantize)
    lm = load_model(str(out), quantize="none")
    assert _weight_files(lm.info.path) == []  # (a conversion by this or an earlier test)
    theirs = _theirs(out, lm.info.path)
    _same_weights(lm.model, theirs)
    ids = torch.tensor([[5, 70, 20, 31, 9, 3]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, theirs(ids).logits)
    # `models list` counts the file's weights (nothing to read them from in the directory).
    n = sum(p.numel() for p in theirs.parameters())
    assert lm.info.n_params == n and _describe_dir(lm.info.path)[0] == n
    bf16 = load_model(str(out), dtype="bf16", quantize="none").model
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.lm_head.weight, theirs.lm_head.weight.bfloat16())


def test_an_older_conversions_fp32_copy_is_given_up(tmp_path, tiny_llama_dir):
    out = export_model(str(tiny_llama_dir), tmp_path / "m.gguf", quantize="q8_0")
    first = load_model(str(out), quantize="none")
    directory = first.info.path
    # What older versions left: transformers' dequantised model saved in the directory.
    theirs = _theirs(out, directory)
    theirs.hf_quantizer = None  # as older versions did: the floats saved as they are
    theirs.save_pretrained(directory)
    meta = ModelMeta.read(directory)
    del meta.extra["weights"], meta.extra["n_params"]
    meta.write(directory)
    assert _weight_files(directory) == ["model.safetensors"]
    again = load_model(str(out), quantize="none")
    assert again.info.path == directory and not again.info.converted
    assert _weight_files(directory) == []  # read from the file from now on
    assert ModelMeta.read(directory).extra["n_params"] == first.info.n_params
    _same_weights(again.model, theirs)


def test_a_moved_file_keeps_its_conversion_and_a_gone_one_is_a_clear_error(tmp_path):
    from conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "src", seed=7)  # content no other test converts
    out = export_model(str(src), tmp_path / "a" / "m.gguf", quantize="q8_0")
    directory = load_model(str(out), quantize="none").info.path
    assert load_model(str(directory), quantize="none").info.path == directory  # by directory
    moved = tmp_path / "b" / "m.gguf"
    moved.parent.mkdir()
    shutil.move(out, moved)
    lm = load_model(str(moved), quantize="none")  # same content: the same conversion
    assert lm.info.path == directory and not lm.info.converted
    assert Path(ModelMeta.read(directory).source) == moved.resolve()
    _same_weights(lm.model, _theirs(moved, directory))
    moved.unlink()
    with pytest.raises(ModelLoadError, match="gone or has changed since it was converted"):
        load_model(str(directory), quantize="none")


def test_a_conversion_that_cannot_finish_leaves_nothing(tmp_path, monkeypatch):
    """A file transformers cannot read: a clear error, no directory left in the cache."""
    bad = tmp_path / "bad.gguf"
    from test_model_cache import write_gguf

    write_gguf(bad, "bad")  # a valid GGUF with no model settings in it
    with pytest.raises(ModelLoadError, match="could not read GGUF file"):
        load_model(str(bad))
    assert not any(
        p.name.startswith(("bad", cache.TEMP_PREFIX)) for p in cache.models_cache_dir().iterdir()
    )


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_the_fast_reader_reads_what_ggufs_own_reader_reads(tmp_path, endian):
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=getattr(gguf.GGUFEndian, endian))
    w.add_name("fields and tensors")
    w.add_context_length(64)
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_token_scores([float(i) / 7 for i in range(300)])
    w.add_array("custom.ints", [3, -1, 7])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("a", x)
    for kind in ("Q8_0", "Q4_1"):
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        w.add_tensor(kind, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs, ours = gguf.GGUFReader(str(path)), gguf_file.open_gguf(path)
    assert type(ours) is not gguf.GGUFReader  # (the fast one did read it)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert ours.fields[name].types == field.types, name
        assert ours.fields[name].contents() == field.contents(), name
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and a.data.shape == b.data.shape
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
    assert gguf_file.gguf_params(ours) == 3 * x.size


def test_a_lora_adapter_on_a_gguf_base_is_merged_into_the_files_weights(tmp_path, tiny_llama_dir):
    """An adapter trained on a GGUF model (its base: the .gguf file) loads its base from
    the file, as the conversion holds no weights."""
    import json

    from peft import LoraConfig, get_peft_model

    out = export_model(str(tiny_llama_dir), tmp_path / "m.gguf", quantize="q8_0")
    base = load_model(str(out), quantize="none")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    peft = get_peft_model(base.model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:  # B starts at zero: a no-op adapter proves nothing
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ids = torch.tensor([[5, 70, 20, 31, 9, 3]])
    with torch.no_grad():
        want = peft(ids).logits
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    base.tokenizer.save_pretrained(adapter)  # with the base's config: what training writes
    shutil.copy(base.info.path / "config.json", adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(out)
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    merged = load_model(str(adapter), quantize="none")
    with torch.no_grad():
        got = merged.model(ids).logits
    assert float((got - want).abs().max()) < 1e-4


def test_models_info_says_where_a_gguf_models_weights_are(tmp_path, tiny_llama_dir, capsys):
    from cli_helpers import run
    from conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "src", seed=11)  # content no other test converts
    out = export_model(str(src), tmp_path / "m.gguf", quantize="q8_0")
    code, text, err = run(["models", "info", str(out)], capsys)
    assert code == 0, err
    weights = next(line for line in text.splitlines() if line.startswith("weights"))
    assert str(out.resolve()) in weights and "read from the file" in weights
    code, text, err = run(["models", "info", str(tiny_llama_dir)], capsys)
    weights = next(line for line in text.splitlines() if line.startswith("weights"))
    assert weights.split()[-1] == str(tiny_llama_dir)  # a directory with its own weights
