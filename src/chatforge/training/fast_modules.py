"""Faster forwards for a model's dropout and tanh-GELU modules while it trains.

Profiling a from-scratch GPT-2 step (4 x 128, batch 8 x 128, 2 AVX2 cores)
found 17 % of the step in torch's Bernoulli sampler (``nn.Dropout``) and ~10 %
in ``NewGELUActivation`` (GPT-2's ``gelu_new``: seven elementwise ops forward,
each saved for backward). :func:`speed_up` swaps, per module instance:

- ``nn.Dropout`` -> :func:`chatforge.training.dropout.dropout` (PCG64 mask);
- ``NewGELUActivation`` -> ``F.gelu(approximate="tanh")``: the same formula,
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, in one fused op (4.4x
  faster forward on a (8, 128, 512) activation), equal to fp32 rounding.

Parameters, state dict and saving are untouched; :func:`restore` puts the
modules' own forwards back, so the model leaves training as it came.
"""

from __future__ import annotations

import types
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from chatforge.training.dropout import dropout


def _dropout_forward(self: nn.Dropout, x: Tensor) -> Tensor:
    return dropout(x, self.p, self.training)


def _gelu_tanh_forward(self: nn.Module, x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def speed_up(model: nn.Module) -> list[nn.Module]:
    """Swap the forward of every plain ``nn.Dropout`` and ``NewGELUActivation`` in ``model``.

    Returns the modules swapped (give them to :func:`restore`)."""
    from transformers.activations import NewGELUActivation

    swapped = []
    for module in model.modules():
        if "forward" in vars(module):  # already swapped (here or by someone else)
            continue
        if type(module) is nn.Dropout and not module.inplace:
            module.forward = types.MethodType(_dropout_forward, module)
        elif type(module) is NewGELUActivation:
            module.forward = types.MethodType(_gelu_tanh_forward, module)
        else:
            continue
        swapped.append(module)
    return swapped


def restore(modules: list[Any]) -> None:
    """Give the modules :func:`speed_up` swapped their own forwards back."""
    for module in modules:
        vars(module).pop("forward", None)
