"""Binding a :class:`FastDecoder`'s weights and KV pool to the C forward step.

``kernels/decode.c`` runs all layers of a Llama-family or GPT-2 model in one
call, for any rows (see there for why). It reads the decoder's own tensors
through pointers, so nothing is copied; the structures below only say where
they are. It applies to fp32 activations with dense fp32 or native int8/int4
linears; anything else (bf16, torch's quantised kernels) keeps the torch path.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from chatforge.models.fast import native
from chatforge.models.fast.layout import LINEARS
from chatforge.models.fast.linear import DenseLinear, QuantLinear
from chatforge.models.fast.lora import LoraAdapter

if TYPE_CHECKING:
    from chatforge.models.fast.model import FastDecoder, Norm, PagedKV


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
    if isinstance(lin, QuantLinear) and lin.native:
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


def _fp32(t: Tensor | None) -> bool:
    return t is None or t.dtype == torch.float32


class NativeDecode:
    """The C forward step for one decoder (build with :meth:`build`)."""

    def __init__(self, model: native.CModel, layers: Any, keep: list[Tensor]) -> None:
        self.model = model
        self._layers = layers  # the ctypes array the model points into
        self._keep = keep  # tensors the structures point into

    @classmethod
    def build(cls, dec: FastDecoder) -> NativeDecode | None:
        """The C step for ``dec``, or None where it does not apply."""
        cfg = dec.cfg
        if cfg.dtype != torch.float32 or not native.available():
            return None
        if cfg.arch == "llama" and (dec.rope is None or cfg.head_dim % 2):
            return None
        layers = (native.CLayer * cfg.n_layers)()
        keep: list[Tensor] = []
        for c, layer in zip(layers, dec.layers, strict=True):
            lins = [_c_lin(getattr(layer, name)) for name in LINEARS]
            norms = (layer.norm1, layer.norm2)
            if any(lin is None for lin in lins) or any(
                n.rms != (cfg.arch == "llama") or not (_fp32(n.weight) and _fp32(n.bias))
                for n in norms
            ):
                return None
            c.norm1, c.norm2 = (n.weight.data_ptr() for n in norms)
            c.norm1_b, c.norm2_b = (None if n.bias is None else n.bias.data_ptr() for n in norms)
            c.qkv, c.out, c.up, c.down = lins
            keep += [n.weight for n in norms] + [n.bias for n in norms if n.bias is not None]
        rope = None
        if dec.rope is not None:
            rope = torch.view_as_real(dec.rope).contiguous()  # (P, D/2, 2) cos, sin
            keep.append(rope)
        up = dec.layers[0].up.out_features
        model = native.CModel(
            n_layers=cfg.n_layers,
            hidden=cfg.hidden,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            inter=up // 2 if cfg.arch == "llama" else up,
            eps=cfg.eps,
            arch=0 if cfg.arch == "llama" else 1,
            layers=layers,
            rope=None if rope is None else rope.data_ptr(),
        )
        return cls(model, layers, keep)

    @staticmethod
    def lora_table(adapters: list[LoraAdapter], n_layers: int) -> ctypes.Array | None:
        """The flat ``CLora`` array (n_adapters, n_layers, 4) decode.c reads the
        adapters' deltas from (it points into the adapters' tensors: keep them)."""
        if not adapters:
            return None
        table = (native.CLora * (len(adapters) * n_layers * len(LINEARS)))()
        for a, adapter in enumerate(adapters):
            for li, layer in enumerate(adapter.layers):
                for j, name in enumerate(LINEARS):
                    delta = layer.get(name)
                    if delta is not None:
                        c = table[(a * n_layers + li) * len(LINEARS) + j]
                        a_t, b_t, spans, scales = delta.packed()
                        c.a_t, c.b_t, c.r = a_t.data_ptr(), b_t.data_ptr(), delta.rank
                        c.spans, c.scales = spans.data_ptr(), scales.data_ptr()
        return table

    def run(
        self,
        x: Tensor,
        pos: Tensor,
        seq: Tensor,
        tables: Tensor,
        kv: PagedKV,
        row_lora: Tensor | None = None,
        loras: ctypes.Array | None = None,
    ) -> None:
        """Rows ``x`` (R, hidden) fp32 contiguous through all layers in place; writes ``kv``.
        ``row_lora`` (R,) int32: each row's slot in ``loras`` (:meth:`lora_table`), -1: none."""
        key = (id(self), kv.k[0].data_ptr(), kv.n_blocks)
        bound = kv.native
        if bound is None or bound[0] != key:  # a new pool, or its tensors were regrown
            n = len(kv.k)
            model = native.CModel.from_buffer_copy(self.model)  # per pool: thread-safe
            model.k_cache = (ctypes.c_void_p * n)(*[t.data_ptr() for t in kv.k])
            model.v_cache = (ctypes.c_void_p * n)(*[t.data_ptr() for t in kv.v])
            model.block = kv.block_size
            bound = kv.native = (key, model, model.k_cache, model.v_cache)
        native.forward(
            bound[1],
            x,
            pos.to(torch.int64).contiguous(),
            seq.to(torch.int32).contiguous(),
            tables.to(torch.int32).contiguous(),
            None if row_lora is None else row_lora.to(torch.int32).contiguous(),
            loras if row_lora is not None else None,
        )

    @staticmethod
    def norm(h: Tensor, n: Norm) -> Tensor:
        """The final norm of rows ``h`` (R, hidden), per row in C."""
        return native.norm(h.float(), n.weight, n.bias, n.eps)
