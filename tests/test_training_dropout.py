"""Training's faster dropout, GELU and attention dropout (training/dropout.py, fast_modules.py,
packed_attention.py) compute what torch's modules compute, with masks drawn our way."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from chatforge.training.dropout import dropout, dropout_mask
from chatforge.training.examples import IGNORE, Row, collate
from chatforge.training.fast_modules import restore, speed_up
from chatforge.training.loss import forward_loss
from chatforge.training.packed_attention import (
    NAME,
    _dropout_attention,
    restore_attention,
    use_packed_attention,
)
from training_helpers import loss_and_grads, tiny_config, write_convmodel


def test_dropout_is_the_mask_times_the_rescale_forward_and_backward():
    x = torch.randn(6, 50, 33, requires_grad=True)
    torch.manual_seed(7)
    y = dropout(x, 0.2)
    torch.manual_seed(7)  # the same draw: the mask comes from torch's generator
    keep, scale = dropout_mask(tuple(x.shape), 0.2, x.device)
    assert 0.77 < keep.float().mean() < 0.83
    torch.testing.assert_close(y, x.detach() * keep * scale, rtol=0, atol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy * keep * scale, rtol=0, atol=0)
    assert dropout(x, 0.2, training=False) is x and dropout(x, 0.0) is x


def _bernoulli_calls(fn) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if "bernoulli" in e.key)


def _gpt2(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    model.train()
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (20,), generator=g).tolist()
    return collate([Row(ids, None, ids[1:] + [IGNORE], [12, 8])], 0)


def test_speed_up_trains_the_same_gpt2_without_torchs_sampler(tiny_gpt2_dir):
    model = _gpt2(tiny_gpt2_dir)
    batch = _batch()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.1 for m in dropouts)
    for m in dropouts:  # without dropout: the same loss and gradients (GELU in one op)
        m.p = 0.0
    want = loss_and_grads(model, batch)
    swapped = speed_up(model)
    assert len(swapped) == len(dropouts) + 2  # and the two layers' GELUs
    got = loss_and_grads(model, batch)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, atol=1e-5, rtol=1e-4, msg=name)
    for m in dropouts:
        m.p = 0.1
    assert _bernoulli_calls(lambda: loss_and_grads(model, batch)) == 2  # sdpa's attention dropout
    before = use_packed_attention(model, lambda: True)  # the mask path with our dropout
    assert _bernoulli_calls(lambda: loss_and_grads(model, batch)) == 0
    a, b = forward_loss(model, batch), forward_loss(model, batch)
    assert a != b  # dropout is on: each forward draws new masks
    restore(swapped)
    restore_attention(model, before)
    assert not any("forward" in vars(m) for m in model.modules())
    assert _bernoulli_calls(lambda: loss_and_grads(model, batch)) > 0  # torch's own again


@pytest.mark.parametrize("mask_kind", ["additive", "bool", "none"])
def test_attention_with_dropout_is_the_math_path(mask_kind):
    """softmax(q k^T / sqrt(d) + mask) with the dropout mask, times v; grouped-query heads."""
    from transformers.integrations.sdpa_attention import repeat_kv

    g = torch.Generator().manual_seed(2)
    B, H, Hkv, T, D = 2, 4, 2, 9, 8
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, D, generator=g, requires_grad=True) for _ in range(2))
    additive = collate(
        [Row([1] * 9, None, [IGNORE] * 9, [5, 4]), Row([1] * 7, None, [IGNORE] * 7, [7])], 0
    )
    additive = additive["attention_mask"]  # (B, 1, T, T), second row padded
    allowed = additive == 0
    mask = {"additive": additive, "bool": allowed, "none": None}[mask_kind]
    if mask_kind == "none":
        allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    torch.manual_seed(5)
    out = _dropout_attention(q, k, v, mask, 0.25, None)  # (B, T, H, D)
    torch.manual_seed(5)
    keep, scale = dropout_mask((B, H, T, T), 0.25, q.device)
    kk, vv = repeat_kv(k, 2), repeat_kv(v, 2)
    scores = (q @ kk.transpose(-1, -2)) / D**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    want = ((probs * keep * scale) @ vv).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dy)
    ref = torch.autograd.grad(want, (q, k, v), dy)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # no dropout: what sdpa gives
    with torch.no_grad():
        plain = _dropout_attention(q, k, v, mask, 0.0, None)
        sdpa = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed).transpose(1, 2)
    torch.testing.assert_close(plain, sdpa, atol=1e-5, rtol=1e-5)


def test_the_trainer_runs_gpt2_attention_dropout_on_the_mask_without_torchs_sampler(
    tmp_path, tiny_gpt2_dir
):
    """GPT-2 (attn_pdrop 0.1) trains on the batch's mask with our dropout, and leaves with
    its own attention and modules."""
    import chatforge.training.packed_attention as pa
    from chatforge.training.trainer import train

    data = write_convmodel(tmp_path / "d.jsonl", n=24)
    cfg = tiny_config(data, tmp_path / "out", tiny_gpt2_dir, max_steps=3)
    calls = []
    real = pa._dropout_attention

    def spy(*args, **kw):
        calls.append(args[4])  # the dropout rate
        return real(*args, **kw)

    pa._dropout_attention = spy
    try:
        with torch.profiler.profile() as prof:
            result = train(cfg)
    finally:
        pa._dropout_attention = real
    assert calls and all(p == pytest.approx(0.1) for p in calls)
    assert not any("bernoulli" in e.key for e in prof.key_averages())
    model = result.model
    assert model.config._attn_implementation == "sdpa"
    # (only the modules speed_up swaps: accelerate may wrap the model's own forward)
    from transformers.activations import NewGELUActivation

    ours = [m for m in model.modules() if isinstance(m, (torch.nn.Dropout, NewGELUActivation))]
    assert ours and not any("forward" in vars(m) for m in ours)
    assert NAME not in (result.output / "config.json").read_text()
