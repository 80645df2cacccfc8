"""Dropout for training on a CPU: masks from numpy's PCG64, applied as fp32 multiplies.

torch's CPU dropout draws its keep-mask with a single-threaded Bernoulli sampler:
10.5 ms for a (8, 128, 512) activation on a 2-core AVX2 EPYC, where the same
mask drawn here takes 0.7 ms (four 16-bit draws per 64-bit PCG64 output,
compared with ``round(p * 65536)``). Multiplying by a bool mask is slow too
(torch casts it element by element: 2.5 ms for that shape); the mask is read as
uint8 and widened to the activation's dtype first (0.08 ms), then multiplied.
From-scratch GPT-2 has 13 dropouts a step (embeddings, attention weights and
two residual branches per layer): torch's sampler was 17 % of a step.

The seed of each mask comes from torch's default generator, so ``--seed`` and a
resumed run (which restores torch's RNG state) draw the same masks. ``p`` is
applied at a resolution of 1/65536 and the kept values are rescaled by
``65536 / (65536 - round(p * 65536))``: unbiased for the quantised ``p``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

LEVELS = 65536  # dropout resolution: the mask compares 16-bit draws with round(p * LEVELS)


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device) -> tuple[Tensor, float]:
    """A (shape) bool keep-mask with P(keep) = 1 - p, and the 1 / P(keep) rescale.

    On CPU the draws come from numpy's PCG64 seeded from torch's default generator;
    elsewhere from ``torch.rand`` on the device."""
    n = int(np.prod(shape))
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p, 1.0 / (1.0 - p)
    cut = round(p * LEVELS)
    seed = int(torch.randint(0, 2**62, (1,)))  # advances torch's generator: seeded and resumable
    raw = np.random.PCG64(seed).random_raw((n + 3) // 4)  # (ceil(n/4),) uint64
    keep = raw.view(np.uint16)[:n] >= cut  # (n,) bool: 16-bit draws in [0, 65536)
    return torch.from_numpy(keep).view(shape), LEVELS / (LEVELS - cut)


def widen(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as 0/1 values of ``dtype`` (via uint8: torch's bool cast is ~5x slower)."""
    return mask.view(torch.uint8).to(dtype)


class DropoutFn(torch.autograd.Function):
    """``x * mask * scale`` whose backward is ``dy * mask * scale``; saves the bool mask only."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        # x (...), mask (...) bool, same shape
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return (x * widen(mask, x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (mask,) = ctx.saved_tensors
        return (dy * widen(mask, dy.dtype)).mul_(ctx.scale), None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``torch.nn.functional.dropout`` with the mask from :func:`dropout_mask`."""
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    mask, scale = dropout_mask(tuple(x.shape), p, x.device)
    return DropoutFn.apply(x, mask, scale)  # the mask is made on x's device
