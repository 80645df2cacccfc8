"""Binding a :class:`FastDecoder`'s weights and KV cache to the C decode step.

``kernels/decode.c`` runs all layers of a Llama-family decode step in one call
(see there for why). It reads the decoder's own tensors through pointers, so
nothing is copied; the structures below only say where they are. It applies
to fp32 activations with dense fp32 or native int8/int4 linears; anything else
(GPT-2, bf16, torch's quantised kernels) keeps the torch path.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from chatforge.models.fast import native
from chatforge.models.fast.linear import DenseLinear, _QuantLinear

if TYPE_CHECKING:
    from chatforge.models.fast.model import FastDecoder, KVCache


def _c_lin(lin: Any) -> native.CLin | None:
    """The C view of one linear, or None where the C step cannot run it."""
    if lin.in_features % native.QK:
        return None
    bias = None if lin.bias is None else lin.bias.data_ptr()
    if isinstance(lin, DenseLinear):
        if lin.weight.dtype != torch.float32 or (
            lin.bias is not None and lin.bias.dtype != torch.float32
        ):
            return None
        return native.CLin(
            32, 0, lin.weight.data_ptr(), None, bias, lin.out_features, lin.in_features
        )
    if isinstance(lin, _QuantLinear) and lin.native:
        return native.CLin(
            lin.kind,
            0,
            lin.weight_q.data_ptr(),
            lin.scales.data_ptr(),
            bias,
            lin.out_features,
            lin.in_features,
        )
    return None


class NativeDecode:
    """The C decode step for one decoder (build with :meth:`build`)."""

    def __init__(self, model: native.CModel, keep: list[Tensor]) -> None:
        self.model = model
        self._keep = keep  # tensors the structure points into

    @classmethod
    def build(cls, dec: FastDecoder) -> NativeDecode | None:
        """The C step for ``dec``, or None where it does not apply."""
        cfg = dec.cfg
        if (
            cfg.arch != "llama"
            or cfg.dtype != torch.float32
            or dec.rope is None
            or cfg.head_dim % 2
            or not native.available()
        ):
            return None
        layers = (native.CLayer * cfg.n_layers)()
        keep: list[Tensor] = []
        for c, layer in zip(layers, dec.layers, strict=True):
            lins = [_c_lin(getattr(layer, name)) for name in ("qkv", "out", "up", "down")]
            norms = (layer.norm1, layer.norm2)
            if any(lin is None for lin in lins) or any(
                not n.rms or n.weight.dtype != torch.float32 for n in norms
            ):
                return None
            c.norm1, c.norm2 = (n.weight.data_ptr() for n in norms)
            c.qkv, c.out, c.up, c.down = lins
            keep += [n.weight for n in norms]
        rope = torch.view_as_real(dec.rope).contiguous()  # (P, D/2, 2) cos, sin
        keep.append(rope)
        model = native.CModel(
            n_layers=cfg.n_layers,
            hidden=cfg.hidden,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            inter=dec.layers[0].up.out_features // 2,
            eps=cfg.eps,
            layers=layers,
            rope=rope.data_ptr(),
        )
        out = cls(model, keep)
        out._layers = layers  # keep the ctypes array alive
        return out

    def run(self, x: Tensor, pos: Tensor, cache: KVCache) -> None:
        """``x`` (B, hidden) fp32 contiguous through all layers in place; writes the cache."""
        key = (id(self), cache.k[0].data_ptr(), cache.capacity)
        bound = cache.native
        if bound is None or bound[0] != key:  # a new cache, or its tensors were regrown
            n = len(cache.k)
            model = native.CModel.from_buffer_copy(self.model)  # per cache: thread-safe
            model.k_cache = (ctypes.c_void_p * n)(*[t.data_ptr() for t in cache.k])
            model.v_cache = (ctypes.c_void_p * n)(*[t.data_ptr() for t in cache.v])
            model.capacity = cache.capacity
            bound = cache.native = (key, model, model.k_cache, model.v_cache)
        native.decode_layers(bound[1], x, pos)
