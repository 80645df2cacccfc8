"""The fused LoRA linear trains exactly what peft's modules train."""

from __future__ import annotations

import pytest
import torch

from chatforge.training.config import TrainConfig
from chatforge.training.dropout import LEVELS, dropout_mask
from chatforge.training.lora_fast import LoraLinearFn, fuse_lora
from chatforge.training.model import apply_lora


def _lora_model(path, dropout: float = 0.0, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    cfg = TrainConfig(data=["x"], output="o", model=str(path), lora=True, lora_dropout=dropout)
    model = apply_lora(model, cfg)
    with torch.no_grad():  # peft starts B at zero: make the adapter path carry signal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    for name, m in model.named_modules():  # GPT-2's own dropout off: deterministic passes
        if isinstance(m, torch.nn.Dropout) and "lora_dropout" not in name:
            m.p = 0.0
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_fused_forward_and_gradients_equal_peft(which, tiny_llama_dir, tiny_gpt2_dir):
    """Without dropout the fused layers give peft's loss and the same gradient for every
    adapter weight (GPT-2's Conv1D layers store the weight transposed: covered)."""
    path = tiny_llama_dir if which == "llama" else tiny_gpt2_dir
    model = _lora_model(path)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 17))
    loss_a, grads_a = _loss_and_grads(model, ids)
    n = fuse_lora(model)
    assert n > 0 and fuse_lora(model) == 0  # idempotent
    loss_b, grads_b = _loss_and_grads(model, ids)
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert all("lora_" in name for name in grads_a)  # the base stays frozen
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name


def test_fused_layer_falls_back_to_peft_where_it_does_not_apply(tiny_llama_dir):
    """Adapters switched off (DPO's reference pass), no_grad and merged weights run
    peft's own forward, with peft's results."""
    model = _lora_model(tiny_llama_dir)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, 9))
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        tuned = model(input_ids=ids).logits
    fuse_lora(model)
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base)
        assert torch.equal(model(input_ids=ids).logits, tuned)
    with model.disable_adapter():  # with gradients on: still the base alone
        assert torch.allclose(model(input_ids=ids).logits, base, atol=1e-6)
    assert not torch.allclose(base, tuned)


def test_dropout_path_matches_the_formula_with_the_same_mask():
    """With a dropout mask, output and gradients are those of
    x W^T + b + alpha ((x * m) A^T) B^T: nothing about the mask is lost in backward."""
    torch.manual_seed(0)
    M, K, N, r = 12, 10, 7, 3
    x = torch.randn(2, 6, K, requires_grad=True)
    w, bias = torch.randn(N, K), torch.randn(N)
    a = torch.randn(r, K, requires_grad=True)
    b = torch.randn(N, r, requires_grad=True)
    mask = torch.rand(M, K) > 0.3
    y = LoraLinearFn.apply(x, w, bias, a, b, 0.7, mask, False)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = x.grad.clone(), a.grad.clone(), b.grad.clone()
    x.grad = a.grad = b.grad = None
    ref = x @ w.t() + bias + 0.7 * ((x * mask.view(2, 6, K)) @ a.t()) @ b.t()
    assert torch.allclose(y, ref, atol=1e-5)
    (ref * g).sum().backward()
    for mine, theirs in zip(got, (x.grad, a.grad, b.grad), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_dropout_mask_rate_rescale_and_seeding():
    torch.manual_seed(3)
    keep, rescale = dropout_mask((1000, 1000), 0.05, torch.device("cpu"))
    cut = round(0.05 * LEVELS)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    assert abs((1 - keep.float().mean().item()) - 0.05) < 0.002  # drop rate ~ p
    assert rescale == pytest.approx(LEVELS / (LEVELS - cut))  # unbiased for the quantised p
    torch.manual_seed(3)  # the same torch seed draws the same mask (--seed, --resume)
    again, _ = dropout_mask((1000, 1000), 0.05, torch.device("cpu"))
    assert torch.equal(keep, again)
    other, _ = dropout_mask((1000, 1000), 0.05, torch.device("cpu"))
    assert not torch.equal(keep, other)  # and the next call a new one


def test_training_with_dropout_learns_like_peft(tiny_llama_dir):
    """Dropout on: masks differ from peft's (another sampler), so steps differ by noise,
    but a few optimizer steps lower the loss by about as much on both paths."""
    losses = {}
    for fused in (False, True):
        model = _lora_model(tiny_llama_dir, dropout=0.1)
        if fused:
            fuse_lora(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        ids = torch.tensor([[5, 9, 2, 7] * 4] * 4)  # a pattern to learn: (4, 16)
        torch.manual_seed(1)
        seen = []
        for _ in range(20):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            seen.append(loss.item())
        losses[fused] = seen
    for path in losses.values():
        assert path[-1] < path[0] - 0.3
    assert abs(losses[True][-1] - losses[False][-1]) < 0.25
