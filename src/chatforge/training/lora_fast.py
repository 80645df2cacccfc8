"""A fused LoRA linear for training: the frozen base and the adapter in one autograd node.

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``
as separate modules. On a CPU, profiling a SmolLM2 LoRA step (r 8, all linear
layers, 4 x 256 tokens, 2 AVX2 cores) found a third of the step outside the
base matmuls: ``nn.Dropout`` drawing its mask with torch's single-threaded
Bernoulli sampler (~4 ms per (M, K) input, 210 modules a step: 15 % of the
step), the scaling multiplied into the wide (M, N) output, an out-of-place
(M, N) add, and six autograd nodes per module.

:class:`LoraLinearFn` does the same arithmetic in one node:

    y  = x W^T (+ bias) + s * ((x * m) A^T) B^T        m: the dropout mask / (1 - p)

with the scaling folded into the narrow (M, r) factor, the adapter product added
into the base output in place, and in backward only what is needed: dx (when
the input needs it), dA and dB; the frozen W and bias get no gradient. The
dropout mask comes from :func:`~chatforge.training.dropout.dropout_mask` (numpy's
PCG64, ~6x faster than torch's sampler, seeded from torch's generator, so ``--seed``
and resumed runs draw the same masks; ``p`` at a resolution of 1/65536).

:func:`fuse_lora` swaps the ``forward`` of every peft ``lora.Linear`` in a model;
parameters, state dict, saving and merging stay peft's. Anything the fused path
does not cover (adapters off, merged, several adapters, DoRA and other variants,
autocast, mixed dtypes, extra forward arguments) runs peft's own forward.
Gradients equal peft's to fp32 rounding (``tests/test_lora_fast.py``).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

from chatforge.training.dropout import dropout_mask, widen


class LoraLinearFn(torch.autograd.Function):
    """``x W^T + bias + alpha * ((x * mask) A^T) B^T`` with gradients for x, A and B only."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, alpha, mask, transposed):
        # x (..., K); weight (N, K), or (K, N) when `transposed` (GPT-2's Conv1D);
        # bias (N,) or None; a (r, K); b (N, r); mask (M, K) bool or None;
        # alpha = scaling / P(keep), so the kept inputs need no rescale of their own.
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        w_t = weight if transposed else weight.t()  # (K, N)
        y = torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t  # (M, N)
        # (M, K): the adapter's dropped-out input (the bool mask widened: a bool multiply is slow)
        xd = x2 * widen(mask, x2.dtype) if mask is not None else x2
        h = xd @ a.t()  # (M, r)
        y.addmm_(h, b.t(), alpha=alpha)
        ctx.save_for_backward(weight, a, b, xd, h, mask)
        ctx.alpha, ctx.transposed, ctx.x_shape = alpha, transposed, x.shape
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        weight, a, b, xd, h, mask = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, N)
        # The narrow products are memory-bound; MKL reads dy (M, N) up to 10x faster with
        # the wide operand on the right: (h^T dy)^T for dB took 0.9 ms where dy^T h
        # (peft's lora_B weight gradient) took 9.7 ms at M=1024, N=1536 on AVX2.
        dh = (b.t() @ dy2.t()).t().mul_(ctx.alpha)  # (M, r): gradient at the narrow middle
        grad_a = dh.t() @ xd if ctx.needs_input_grad[3] else None  # (r, K)
        grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = (h.t() @ dy2).mul_(ctx.alpha).t()  # (N, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = dy2 @ (weight.t() if ctx.transposed else weight)  # (M, K)
            if mask is None:
                grad_x.addmm_(dh, a)
            else:
                grad_x.add_((dh @ a).mul_(widen(mask, dh.dtype)))
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _fused_forward(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The forward swapped into a peft ``lora.Linear`` (``self``); peft's own where not covered."""
    plan = _plan(self, x) if not args and not kwargs else None
    if plan is None:
        return self._peft_forward(x, *args, **kwargs)
    base, name, transposed = plan
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    mask, rescale = None, 1.0
    if p > 0:
        mask, rescale = dropout_mask((x.numel() // x.shape[-1], x.shape[-1]), p, x.device)
    alpha = float(self.scaling[name]) * rescale
    return LoraLinearFn.apply(x, base.weight, base.bias, a, b, alpha, mask, transposed)


def _plan(layer: Any, x: Tensor) -> tuple[Any, str, bool] | None:
    """(base layer, adapter name, weight transposed) when the fused path applies, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None  # another adapter type's layer, or DoRA and the other variants
    if getattr(layer, "lora_bias", {}).get(name) or layer.lora_B[name].bias is not None:
        return None
    base = layer.base_layer
    transposed = bool(getattr(layer, "fan_in_fan_out", False))
    if not isinstance(base, nn.Linear) and type(base).__name__ != "Conv1D":
        return None
    w, a = base.weight, layer.lora_A[name].weight
    if w.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None  # a trainable base weight needs its own gradient
    if torch.is_autocast_enabled(x.device.type) or not (x.dtype == w.dtype == a.dtype):
        return None
    if not torch.is_grad_enabled():
        return None  # inference (validation, eval): peft's forward saves nothing either
    return base, name, transposed


def fuse_lora(model: nn.Module) -> int:
    """Swap every peft ``lora.Linear``'s forward for the fused one; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
