"""Training memory: the chunked loss equals the full-logits one; too-big runs are refused."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.training.examples import IGNORE, Row, collate, loss_sum, model_inputs
from chatforge.training.loss import forward_loss, head_gives_logits, output_head
from cli_helpers import run
from training_helpers import tiny_config, write_convmodel


def _model(path, lora: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    if lora:
        from chatforge.training.config import TrainConfig
        from chatforge.training.model import apply_lora

        cfg = TrainConfig(data=["x"], output="o", model=str(path), lora=True, lora_dropout=0.0)
        model = apply_lora(model, cfg)
    model.train()
    for m in model.modules():  # deterministic: the two passes must see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    rows = []
    for lengths in ([7, 9, 5], [12, 6]):
        n = sum(lengths)
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        keep = torch.rand(n, generator=g) < 0.6
        targets = [
            t if k else IGNORE for t, k in zip(ids[1:] + [IGNORE], keep.tolist(), strict=True)
        ]
        rows.append(Row(ids, None, targets, lengths))
    return collate(rows, 0)


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("which", ["gpt2", "llama", "llama-lora"])
def test_chunked_loss_and_gradients_equal_the_full_logits_formula(
    which, tiny_gpt2_dir, tiny_llama_dir
):
    path = tiny_gpt2_dir if which == "gpt2" else tiny_llama_dir
    model = _model(path, lora=which.endswith("lora"))
    batch = _batch(model.get_input_embeddings().num_embeddings)
    assert head_gives_logits(model, model.get_input_embeddings().num_embeddings)

    def old():
        return loss_sum(model(**model_inputs(batch)).logits, batch["targets"])

    loss_a, grads_a = _loss_and_grads(model, old)
    loss_b, grads_b = _loss_and_grads(model, lambda: forward_loss(model, batch, chunk=4))
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name
    with torch.no_grad():  # validation path: no checkpointing, same value
        assert torch.allclose(forward_loss(model, batch), loss_a, rtol=1e-5, atol=1e-5)


def _vocab_rows(model, batch, vocab: int) -> list[int]:
    """Rows of every (rows, vocab) matrix product made by forward + backward of the loss."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[int] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith(("mm", "addmm", "bmm")) and out.shape[-1] == vocab:
                seen.append(out.reshape(-1, vocab).shape[0])
            return out

    with Watch():
        forward_loss(model, batch, chunk=4).backward()
    return seen


@pytest.mark.parametrize("fused", [True, False])
def test_full_vocabulary_logits_are_never_made_for_all_positions(tiny_llama_dir, fused):
    model = _model(tiny_llama_dir)
    vocab = model.get_input_embeddings().num_embeddings
    batch = _batch(vocab)
    head = output_head(model)
    if not fused:  # a head that is not a plain linear: chunks recomputed in backward
        head.forward = lambda x, _f=head.forward: _f(x) * 1.0
        head.__class__ = type("Wrapped", (torch.nn.Linear,), {})
    rows = _vocab_rows(model, batch, vocab)
    n_loss = int((batch["targets"] != IGNORE).sum())
    assert rows and max(rows) <= 4  # one chunk of loss positions at a time
    # fused: each position's logits once (their gradient is made with them); else the
    # head runs again for each chunk in backward
    assert sum(rows) == (1 if fused else 2) * n_loss


def test_fused_head_loss_trains_the_head_like_the_formula(tiny_gpt2_dir):
    """A trainable head (GPT-2 full fine-tuning, tied to the embeddings): the head's
    gradient summed over chunks inside the fused loss equals the plain formula's."""
    from chatforge.training.loss import HeadCrossEntropyFn, head_loss_sum

    torch.manual_seed(0)
    w = torch.randn(50, 8, requires_grad=True)
    h = torch.randn(2, 9, 8, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :3] = IGNORE
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = torch.nn.Parameter(w.detach().clone())
    (head_loss_sum(h, head, targets, chunk=4) / 3).backward()
    ref_h = h.detach().clone().requires_grad_(True)
    ref_w = w.detach().clone().requires_grad_(True)
    (loss_sum(ref_h @ ref_w.t(), targets) / 3).backward()
    assert torch.allclose(h.grad, ref_h.grad, atol=1e-6)
    assert torch.allclose(head.weight.grad, ref_w.grad, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(
            HeadCrossEntropyFn.apply(h.reshape(-1, 8)[3:], w, targets.reshape(-1)[3:], 4, False),
            loss_sum(h @ w.t(), targets),
            atol=1e-5,
        )


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_llama_dir):
    from chatforge.training.trainer import train

    data = write_convmodel(tmp_path / "d.jsonl", n=24)
    losses = {}
    for on in (False, True):
        cfg = tiny_config(data, tmp_path / f"o{on}", tiny_llama_dir, grad_checkpointing=on)
        seen = []
        train(cfg, on_step=lambda s, row, seen=seen: seen.append(row["loss"]))
        losses[on] = seen
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_memory_estimate_grows_with_batch_and_context(tiny_llama_dir):
    from chatforge.training.memory import estimate

    model = _model(tiny_llama_dir)
    small = estimate(model, 2, 64, checkpointing=False)
    assert estimate(model, 4, 64, checkpointing=False).activations == 2 * small.activations
    assert estimate(model, 2, 128, checkpointing=False).total > small.total
    assert estimate(model, 2, 64, checkpointing=True).activations < small.activations


def _train_argv(tmp_path, model, *extra):
    data = write_convmodel(tmp_path / "d.jsonl", n=8)
    return [
        "train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
        "--max-steps", "1", "--batch-size", "2", "--context", "64", "--quiet",
        "--eval-every", "0", "--save-every", "0", *extra,
    ]  # fmt: skip


def test_train_refuses_a_run_that_does_not_fit_in_one_line(
    tmp_path, tiny_llama_dir, capsys, monkeypatch
):
    monkeypatch.setattr("chatforge.training.memory.available_bytes", lambda: 1 << 20)
    code, _, err = run(_train_argv(tmp_path, tiny_llama_dir), capsys)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    refusal = [ln for ln in lines if "available" in ln]
    assert len(refusal) == 1, err
    for flag in ("--batch-size", "--context", "--grad-accum", "--force"):
        assert flag in refusal[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing left behind

    code, _, err = run(_train_argv(tmp_path, tiny_llama_dir, "--force"), capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "chatforge.json").read_text())
    assert meta["complete"]
