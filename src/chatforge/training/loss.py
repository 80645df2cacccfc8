"""The training loss without the full logits tensor.

``model(...).logits`` is (B, T, V) in fp32: for SmolLM2 at batch 4 and context
1024 that is 805 MB, and cross-entropy keeps a log-softmax copy of the same
size for backward, plus the gradient. Most positions carry no loss anyway
(user turns, padding). :func:`forward_loss` runs the model with its LM head fed
zero positions, keeps the hidden states the head would have seen, and applies
the head and the cross-entropy only at positions with a target, a chunk at a
time; each chunk's gradient is computed with its loss
(:class:`HeadCrossEntropyFn`; a head that is not a plain fp32 linear is recomputed
in backward instead, by activation checkpointing), so at most one chunk's logits
exist at once. The result equals
:func:`~chatforge.training.examples.loss_sum` over the full logits up to fp32
summation order (``tests/test_training_memory.py``).

A model whose logits are not just ``head(hidden)`` (a logit soft-cap or scale
applied after the head) is detected by :func:`head_gives_logits`; the trainer
then uses the full logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from chatforge.training.examples import IGNORE, Row, collate, model_inputs, to_device

CHUNK = 512  # loss positions per head + cross-entropy chunk (512 x 49k vocab = 100 MB fp32)


def output_head(model: Any) -> Any:
    """The LM head module (peft and DDP wrappers looked through)."""
    from chatforge.training.model import unwrap

    return unwrap(model).get_output_embeddings()


def hidden_states(model: Any, inputs: dict) -> Tensor:
    """The (B, T, D) input of the LM head, with the head itself run on zero positions."""
    seen: list[Tensor] = []

    def tap(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = output_head(model).register_forward_pre_hook(tap)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen[-1]


def _chunk_ce(h: Tensor, t: Tensor, head: Any) -> Tensor:
    return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")


class HeadCrossEntropyFn(torch.autograd.Function):
    """Summed cross-entropy of ``h W^T``, its gradients computed in the forward pass.

    Chunk by chunk, the (chunk, V) logits exist only inside ``forward``: the
    softmax overwrites them in place and becomes the logits' gradient, which
    gives that chunk's rows of dh and its share of dW (accumulated, when the head
    trains) at once; backward only scales those by the incoming gradient. Against
    recomputing each chunk in backward (activation checkpointing) this saves one
    (chunk, D) x (D, V) product and two passes over the logits per chunk.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, grads):
        # h (N, D); weight (V, D); targets (N,) in [0, V); grads: the caller's grad mode
        # (forward runs in no_grad and needs_input_grad ignores the mode: validation
        # must not pay for gradients)
        want_h, want_w = ctx.needs_input_grad[0] and grads, ctx.needs_input_grad[1] and grads
        grad_h = torch.empty_like(h) if want_h else None  # (N, D)
        grad_w = torch.zeros_like(weight) if want_w else None  # (V, D)
        total = h.new_zeros((), dtype=torch.float32)
        # One logits buffer for all chunks, and the softmax in place: logsumexp made a
        # (n, V) temporary per chunk (fresh pages each time): 320 against 250 ms a chunk
        # for SmolLM2's 49k vocabulary at n=439 on AVX2.
        buf = h.new_empty(min(chunk, len(targets)), weight.shape[0])  # (chunk, V)
        for i in range(0, len(targets), chunk):
            hc, tc = h[i : i + chunk], targets[i : i + chunk]  # (n, D), (n,)
            logits = torch.mm(hc, weight.t(), out=buf[: len(tc)])  # (n, V)
            picked = logits.gather(1, tc[:, None]).squeeze(1)  # (n,)
            top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            probs = logits.sub_(top).exp_()  # unnormalised softmax, in place
            norm = probs.sum(dim=-1, keepdim=True)  # (n, 1)
            total += (top.squeeze(1) + norm.squeeze(1).log() - picked).sum()  # lse - picked
            if want_h or want_w:
                probs.div_(norm)
                probs[torch.arange(len(tc), device=h.device), tc] -= 1.0  # d loss / d logits
                if want_h:
                    torch.mm(probs, weight, out=grad_h[i : i + chunk])
                if want_w:
                    grad_w.addmm_(probs.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_loss if ctx.needs_input_grad[0] else None,
            grad_w * grad_loss if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )


def _fusable(head: Any, h: Tensor) -> bool:
    """True when ``head(h)`` is a plain bias-free linear in h's dtype, without autocast."""
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and head.weight.dtype == h.dtype == torch.float32
        and not torch.is_autocast_enabled(h.device.type)
    )


def head_loss_sum(hidden: Tensor, head: Any, targets: Tensor, chunk: int = CHUNK) -> Tensor:
    """Summed cross-entropy of ``head(hidden)`` at positions whose target is not IGNORE."""
    sel = targets != IGNORE
    h, t = hidden[sel], targets[sel]  # (N, D), (N,)
    total = hidden[..., :0].sum().float()  # 0, connected to the graph even when N == 0
    if _fusable(head, h):
        return total + HeadCrossEntropyFn.apply(h, head.weight, t, chunk, torch.is_grad_enabled())
    grad = torch.is_grad_enabled()
    for i in range(0, t.numel(), chunk):
        args = (h[i : i + chunk], t[i : i + chunk], head)
        part = checkpoint(_chunk_ce, *args, use_reentrant=False) if grad else _chunk_ce(*args)
        total = total + part
    return total


def forward_loss(model: Any, batch: dict, chunk: int = CHUNK) -> Tensor:
    """Summed next-token cross-entropy of ``batch``, never materialising (B, T, V) logits."""
    hidden = hidden_states(model, model_inputs(batch))
    return head_loss_sum(hidden, output_head(model), batch["targets"], chunk)


@torch.no_grad()
def head_gives_logits(model: Any, vocab_size: int) -> bool:
    """True when the model's logits are exactly its head applied to the captured hidden states."""
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (6,), generator=g).tolist()
        row = Row(ids, None, [IGNORE] * len(ids), [len(ids)])
        dev = next(model.parameters()).device
        batch = to_device(collate([row], 0), dev)
        logits = model(**model_inputs(batch)).logits.float()
        head = output_head(model)
        if head is None:
            return False
        mine = head(hidden_states(model, model_inputs(batch))).float()
        return mine.shape == logits.shape and bool(
            torch.allclose(mine, logits, atol=1e-5, rtol=1e-4)
        )
    except Exception:  # no separate head, or a head hook the model does not honour
        return False
    finally:
        model.train(was_training)
