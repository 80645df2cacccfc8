"""LoRA adapters applied per request without merging: the same answers as the merged
model, batches that mix adapters and the base, prefix cache kept apart, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatforge import GenerationConfig, Request, load_model
from chatforge.generation.engine import Engine, EngineConfig
from chatforge.models.fast.lora import AdapterError
from lora_helpers import fp16_rounded, make_adapter

GREEDY = GenerationConfig(temperature=0, max_new_tokens=10)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    base = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    a = make_adapter(base, root / "a", seed=1)
    b = make_adapter(base, root / "b", seed=2)
    lm = load_model(str(base), dtype="fp32", quantize="none")
    return lm, a, b


def _engine(lm, **config) -> Engine:
    eng = Engine.from_loaded(lm, EngineConfig(**config))
    eng.stop_token_ids = set()  # random weights: fixed-length outputs
    return eng


def _merged_logits(adapter: Path, ids: list[int]) -> torch.Tensor:
    """transformers' logits of the adapter merged into its base (peft's own merge)."""
    from chatforge.models.loading import load_transformers

    model = load_transformers(adapter, "fp32")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 7, 7]]


def test_an_adapter_per_request_equals_the_merged_model(setup, tmp_path):
    """The same logprobs as peft's merge of the adapter the fast path applies (each
    rank stored in fp16, scaled), and within fp16's rounding of the adapter as saved."""
    lm, a, _ = setup
    eng = _engine(lm)
    eng.add_adapter(a, "a")
    rounded = fp16_rounded(a, tmp_path / "rounded")
    for ids in PROMPTS:
        got = eng.score(ids, top=0)  # noqa: F841 - the prompt path must accept it too
        req = Request(ids, GREEDY, adapter="a", logprobs=5)
        ours = eng.generate([req])[0]
        want = torch.log_softmax(_merged_logits(rounded, ids), -1)
        first = ours.logprobs[0]
        assert ours.token_ids[0] == int(want.argmax())
        assert first.logprob == pytest.approx(float(want[first.token_id]), abs=1e-4)
        as_saved = torch.log_softmax(_merged_logits(a, ids), -1)
        assert first.logprob == pytest.approx(float(as_saved[first.token_id]), abs=2e-3)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["up_proj", "o_proj"], ["k_proj"]])
def test_an_adapter_on_some_parts_of_a_fused_linear(tiny_llama_dir, tmp_path, targets):
    """Q, K and V (gate and up) are one linear here; an adapter on some of them adds
    only to their outputs (decode.c reads each rank's row of B only over its part)."""
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", seed=4, targets=targets, rank=8)
    lm = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")
    eng = _engine(lm)
    eng.add_adapter(adapter, "a")
    rounded = fp16_rounded(adapter, tmp_path / "rounded")
    for ids in PROMPTS:
        one = GREEDY.replace(max_new_tokens=1)
        ours = eng.generate([Request(ids, one, adapter="a", logprobs=5)])[0].logprobs[0]
        want = torch.log_softmax(_merged_logits(rounded, ids), -1)
        assert len(ours.top) == 5
        for token, logprob in ours.top:
            assert logprob == pytest.approx(float(want[token]), abs=1e-4)


def test_adapter_weights_keep_fp16_precision_at_any_scale():
    """Each rank is stored in fp16 times a power of two: a rank of tiny values (fp16's
    subnormals, 6e-8 apart) or of values past fp16's 65504 keeps 11 significant bits."""
    from chatforge.models.fast.lora import fp16_exact

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(64, 3, generator=gen) * torch.tensor([1e-7, 1.0, 1e6])  # a rank per column
    r = fp16_exact(t, 0)
    assert torch.isfinite(r).all()
    assert ((r - t).abs() <= t.abs() * 2**-11).all()
    assert torch.equal(fp16_exact(r, 0), r)  # stored values are kept exactly
    assert torch.equal(fp16_exact(t.t().contiguous(), 1), r.t())  # rows: the same per rank


def test_merged_and_per_request_adapters_generate_the_same_tokens(setup):
    lm, a, _ = setup
    merged = load_model(str(a), dtype="fp32", quantize="none")  # adapter dir: merged at load
    eng_m = _engine(merged)
    eng = _engine(lm)
    eng.add_adapter(a, "a")
    for ids in PROMPTS:
        want = eng_m.generate([Request(ids, GREEDY)])[0].token_ids
        assert eng.generate([Request(ids, GREEDY, adapter="a")])[0].token_ids == want


def test_a_batch_mixing_base_and_adapters_gives_each_its_own_answer(setup):
    lm, a, b = setup
    eng = _engine(lm)
    eng.add_adapter(a, "a")
    eng.add_adapter(b, "b")
    kinds = [None, "a", "b"]
    alone = {
        (k, i): eng.generate([Request(ids, GREEDY, adapter=k)])[0].token_ids
        for k in kinds
        for i, ids in enumerate(PROMPTS)
    }
    # the adapters change the answers (else this test proves nothing)
    assert alone[(None, 0)] != alone[("a", 0)] or alone[(None, 1)] != alone[("a", 1)]
    assert alone[("a", 0)] != alone[("b", 0)] or alone[("a", 1)] != alone[("b", 1)]
    crowd = [(k, i) for i in range(len(PROMPTS)) for k in kinds]
    out = eng.generate([Request(PROMPTS[i], GREEDY, adapter=k) for k, i in crowd])
    for (k, i), c in zip(crowd, out, strict=True):
        assert c.token_ids == alone[(k, i)], (k, i)


def test_the_prefix_cache_is_not_shared_between_adapters(setup):
    lm, a, _ = setup
    eng = _engine(lm)
    eng.add_adapter(a, "a")
    long = list(range(3, 3 + 40))  # several KV blocks
    base = eng.generate([Request(long, GREEDY)])[0]
    with_a = eng.generate([Request(long, GREEDY, adapter="a")])[0]
    assert with_a.cached_tokens == 0  # the base's blocks were not reused
    again = eng.generate([Request(long, GREEDY, adapter="a")])[0]
    assert again.cached_tokens > 0 and again.token_ids == with_a.token_ids
    assert eng.generate([Request(long, GREEDY)])[0].token_ids == base.token_ids


def test_the_torch_path_applies_adapters_too(setup):
    lm, a, _ = setup
    eng = _engine(lm)
    eng.add_adapter(a, "a")
    want = [eng.generate([Request(ids, GREEDY, adapter="a")])[0].token_ids for ids in PROMPTS]
    native = lm.fast.native
    assert native is not None  # the C path ran above
    lm.fast.native = None  # as without a C compiler
    try:
        eng2 = _engine(lm)
        got = [eng2.generate([Request(ids, GREEDY, adapter="a")])[0].token_ids for ids in PROMPTS]
    finally:
        lm.fast.native = native
    assert got == want


def test_adapter_errors_are_clear(setup, tmp_path, tiny_llama_dir, tiny_gpt2_dir):
    lm, a, _ = setup
    eng = _engine(lm)
    with pytest.raises(ValueError, match="'nope' is not loaded"):
        eng.generate([Request([1, 2, 3], GREEDY, adapter="nope")])
    with pytest.raises(AdapterError, match="not a LoRA adapter directory"):
        eng.add_adapter(tmp_path, "x")
    # an adapter of another architecture does not fit this model
    other = tiny_gpt2_dir if lm.fast.cfg.arch == "llama" else tiny_llama_dir
    wrong = make_adapter(other, tmp_path / "wrong", seed=3)
    with pytest.raises(AdapterError, match="cannot apply|do not fit"):
        eng.add_adapter(wrong, "wrong")
    assert "wrong" not in eng.adapters
    # a corrupt weights file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: is not a safetensors"):
        eng.add_adapter(bad, "bad")


def test_an_adapter_in_use_cannot_be_removed(setup):
    lm, a, _ = setup
    eng = _engine(lm)
    eng.add_adapter(a, "a")
    h = eng.add(Request([1, 2, 3], GREEDY, adapter="a"))
    with pytest.raises(AdapterError, match="1 request"):
        eng.remove_adapter("a")
    eng.abort(h)
    prepared = eng.prepare(Request([1, 2, 3], GREEDY, adapter="a"))  # validated, not added
    assert eng.remove_adapter("a") and "a" not in eng.adapters
    assert not eng.remove_adapter("a")
    # unloaded between validation and add: a clear error, not a crash
    with pytest.raises(ValueError, match="'a' is not loaded"):
        eng.add(Request([1, 2, 3], GREEDY, adapter="a"), prepared=prepared)
