"""Attention example by example (training/packed_attention.py) against the block-diagonal mask."""

from __future__ import annotations

import pytest
import torch

from chatforge.training.examples import IGNORE, Row, collate, model_inputs
from chatforge.training.packed_attention import (
    NAME,
    restore_attention,
    spans_match_mask,
    use_packed_attention,
)
from training_helpers import loss_and_grads, tiny_config, write_convmodel


def _rows(types: bool) -> list[Row]:
    """Two packed rows, the second shorter (padding after it), targets everywhere."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for lengths in ([9, 6, 5], [7, 8]):
        n = sum(lengths)
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        targets = ids[1:] + [IGNORE]
        rows.append(Row(ids, [k % 2 for k in range(n)] if types else None, targets, lengths))
    return rows


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_loss_and_gradients_equal_the_mask_path(which, tiny_gpt2_dir, tiny_llama_dir):
    """Training through packed_spans is the mask path's training: same loss, same gradients
    (llama's grouped-query heads included), padding rows included."""
    from transformers import AutoModelForCausalLM

    path = tiny_gpt2_dir if which == "gpt2" else tiny_llama_dir
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    model.config.attn_pdrop = model.config.resid_pdrop = 0.0  # gpt2: compare without dropout
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    rows = _rows(types=which == "gpt2")
    want = loss_and_grads(model, collate(rows, 0))
    before = use_packed_attention(model, lambda: spans_match_mask(model, 300, which == "gpt2"))
    assert before == "sdpa" and model.config._attn_implementation == NAME
    spans = collate(rows, 0, spans=True)
    assert "attention_mask" not in spans and spans["packed_spans"] == ((9, 6, 5), (7, 8))
    got = loss_and_grads(model, spans)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, atol=1e-5, rtol=1e-4, msg=name)
    # one example per row, same length everywhere: the batched call
    single = [
        Row(r.ids[:6], None if r.types is None else r.types[:6], r.targets[:6], [6]) for r in rows
    ]
    with torch.no_grad():
        a = model(**model_inputs(collate(single, 0))).logits
        b = model(**model_inputs(collate(single, 0, spans=True))).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    restore_attention(model, before)
    assert model.config._attn_implementation == "sdpa"


def test_a_model_that_fails_the_check_keeps_its_attention(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa")
    assert use_packed_attention(model, lambda: False) is None
    assert model.config._attn_implementation == "sdpa"

    def broken():
        raise TypeError("forward() got an unexpected keyword argument 'packed_spans'")

    assert use_packed_attention(model, broken) is None
    assert model.config._attn_implementation == "sdpa"


def test_the_trainer_trains_through_spans_and_saves_the_models_own_attention(
    tmp_path, tiny_llama_dir
):
    from chatforge.training.trainer import train

    seen = []

    def on_step(step, row):
        seen.append(len(calls))  # attention calls so far

    data = write_convmodel(tmp_path / "d.jsonl", n=24)
    cfg = tiny_config(data, tmp_path / "out", tiny_llama_dir, lora=True)
    import chatforge.training.packed_attention as pa

    calls = []
    real = pa.packed_attention

    def spy(*args, **kw):
        calls.append(kw.get("packed_spans") is not None)
        return real(*args, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register(NAME, spy)
    try:
        result = train(cfg, on_step=on_step)
    finally:
        AttentionInterface.register(NAME, real)
    assert len(seen) == 4
    steps = calls[seen[0] : seen[-1]]  # steps 2-4 (the first follows the setup's checks)
    assert steps and all(steps)  # every training forward ran on spans, none on the mask
    written = list(result.output.rglob("*.json"))
    assert written and not any(NAME in f.read_text() for f in written)


def test_the_memory_estimate_drops_the_mask_on_packed_attention(tiny_llama_dir):
    """No (B, 1, T, T) mask is built on packed attention: the estimate must not count one
    (it would refuse long contexts that fit)."""
    from transformers import AutoModelForCausalLM

    from chatforge.training import memory

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa")
    masked = memory.estimate(model, 4, 4096, False)
    before = use_packed_attention(model, lambda: True)
    packed = memory.estimate(model, 4, 4096, False)
    restore_attention(model, before)
    assert masked.mask >= 6 * 4 * 4096 * 4096 and packed.mask == 0
    assert packed.total < masked.total
