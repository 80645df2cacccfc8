"""The fast path: logits parity with transformers, quantisation, the slot cache."""

from __future__ import annotations

import pytest
import torch

from chatforge.generation.fast_runner import FastRunner
from chatforge.models.fast import build_fast_model, unsupported_reason


def _tiny(kind: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )
    if kind == "llama-gqa":
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=8, num_key_value_heads=2))
    if kind == "llama-bias-tied":
        return LlamaForCausalLM(
            LlamaConfig(
                **common,
                num_attention_heads=4,
                num_key_value_heads=4,
                attention_bias=True,
                tie_word_embeddings=True,
            )
        )
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2))
    if kind == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=300, n_positions=256, n_embd=64, n_layer=2, n_head=4)
        )
    raise AssertionError(kind)


KINDS = ["llama-gqa", "llama-bias-tied", "qwen2", "gpt2"]


def _randomise_biases(model) -> None:
    # Fresh models have zero biases, which would hide a bias that is dropped.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_logits_match_transformers(kind):
    model = _tiny(kind).eval()
    _randomise_biases(model)
    assert unsupported_reason(model) is None
    fast = build_fast_model(model)
    ids = torch.randint(0, 300, (40,))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]  # (T, V)
    cache = fast.new_cache()
    last = fast.prefill(ids[:30], 0, cache)
    assert torch.allclose(last, ref[29], atol=1e-4, rtol=0)
    for t in range(30, 40):
        got = fast.decode(ids[t : t + 1], cache)[0]
        assert torch.allclose(got, ref[t], atol=1e-4, rtol=0), (t, (got - ref[t]).abs().max())


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_batched_decode_of_different_lengths_matches_single(kind):
    model = _tiny(kind).eval()
    fast = build_fast_model(model)
    prompts = [torch.randint(0, 300, (n,)) for n in (7, 19, 12)]
    nxt = torch.randint(0, 300, (3, 6))
    runner = FastRunner(fast)
    # All three in one batch (left-padded prefill, then batched decode steps).
    t = max(len(p) for p in prompts)
    ids = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :], mask[i, t - len(p) :] = p, 1
    _, state = runner.prefill(ids, mask)
    batched = [runner.decode(state, nxt[:, j]) for j in range(6)]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.cat([p, nxt[i]])[None]).logits[0, len(p) :]  # (6, V)
        for j in range(6):
            assert torch.allclose(batched[j][i], ref[j], atol=1e-4, rtol=0)


def test_leaving_sequences_keep_the_others_intact():
    """Freeing a slot moves the last sequence into it; its logits must not change."""
    model = _tiny("llama-gqa").eval()
    fast = build_fast_model(model)
    runner = FastRunner(fast)
    prompts = [torch.randint(0, 300, (n,)) for n in (5, 9, 13)]
    t = 13
    ids = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :], mask[i, t - len(p) :] = p, 1
    _, state = runner.prefill(ids, mask)
    state = runner.select(state, torch.tensor([2, 1]))  # row 0 leaves; order changes too
    nxt = torch.tensor([11, 22])
    got = runner.decode(state, nxt)
    for row, i in enumerate([2, 1]):
        with torch.no_grad():
            ref = model(torch.cat([prompts[i], nxt[row : row + 1]])[None]).logits[0, -1]
        assert torch.allclose(got[row], ref, atol=1e-4, rtol=0)
    # A new sequence joins; all three decode together.
    ids2 = torch.randint(0, 300, (1, 4))
    _, s2 = runner.prefill(ids2, torch.ones(1, 4, dtype=torch.long))
    state = runner.merge(state, s2)
    assert runner.in_use == 3


def test_cache_grows_past_its_first_capacity():
    model = _tiny("llama-gqa").eval()
    fast = build_fast_model(model)
    cache = fast.new_cache()
    ids = torch.randint(0, 300, (200,))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    fast.prefill(ids[:10], 0, cache)
    start = cache.capacity
    for t in range(10, 200):
        got = fast.decode(ids[t : t + 1], cache)[0]
    assert cache.capacity >= 200 and start <= cache.capacity
    assert torch.allclose(got, ref[199], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("quant", "tol"), [("int8", 0.05), ("int4", 0.35)])
def test_quantised_logits_stay_close(quant, tol):
    model = _tiny("llama-gqa").eval()
    dense = build_fast_model(model)
    q = build_fast_model(model, quantize=quant)
    assert q.weight_bytes < dense.weight_bytes / (3.5 if quant == "int8" else 4.5)
    ids = torch.randint(0, 300, (20,))
    a = dense.prefill(ids, 0, dense.new_cache())
    b = q.prefill(ids, 0, q.new_cache())
    assert (a - b).abs().max() < tol * a.abs().max()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99


def test_unsupported_architectures_say_why():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    assert "no fast path" in unsupported_reason(m)
    with pytest.raises(ValueError, match="no fast path"):
        build_fast_model(m)
    with pytest.raises(ValueError, match="unknown quantization"):
        build_fast_model(_tiny("gpt2"), quantize="int3")
