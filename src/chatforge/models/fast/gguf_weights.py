"""A GGUF file's 4- and 8-bit weights, taken as they are into the fast path's kernels.

llama.cpp's ``Q4_1`` block (32 inputs: fp16 scale ``d``, fp16 minimum ``m``, 16
bytes whose byte ``j`` holds ``q[j]`` in its low nibble and ``q[j + 16]`` in its
high one, ``w = q * d + m``) is exactly our int4 kernel's layout, and ``Q4_0``
(``w = (q - 8) * d``) is the same with ``m = -8 d`` (exact in fp16). ``Q8_0``
(fp16 ``d``, 32 int8 ``q``, ``w = q * d``) is our kind-8 kernel's. So a GGUF
model quantised that way runs on our kernels with the very weights llama.cpp
runs: nothing is expanded to fp32 and quantised again (which adds error to a
model that was already 4-bit). Its token embeddings stay blocks too
(:class:`BlockEmbedding`: the rows a step looks up are expanded, exactly).

Row order: llama.cpp's converter stores a Llama's ``attn_q``/``attn_k`` with each
head's rotary halves interleaved, which is the order our decoder uses too (see
``layout.interleave``), so those rows are taken as they are; a Qwen2's are in
transformers' order (llama.cpp rotates them NEOX-style) and are reordered, rows
being independent of each other's blocks (:data:`QK_ORDER`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chatforge.models.fast.linear import Int4Linear, Int8Linear, Linear
from chatforge.models.gguf_file import open_gguf, source_gguf

BLOCK = 32  # inputs per block
Q4_KINDS = ("Q4_0", "Q4_1")
KINDS = (*Q4_KINDS, "Q8_0")  # the block types our kernels take as they are
# How llama.cpp's converter orders attn_q/attn_k rows, by GGUF architecture: "pairs"
# (each head's rotary halves interleaved, LlamaModel.permute: our order) or "halves"
# (transformers' order). Architectures not named here: Q/K blocks are not taken.
QK_ORDER = {"llama": "pairs", "qwen2": "halves"}


def _fp16(raw: Tensor) -> Tensor:
    """(..., 2) uint8 -> (...) fp16."""
    return raw.contiguous().view(torch.float16)[..., 0]


class GGUFWeights:
    """The tensors of one GGUF file (memory-mapped), by llama.cpp name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        reader = open_gguf(self.path)
        self.tensors = {t.name: t for t in reader.tensors}
        arch = reader.fields.get("general.architecture")
        self.arch = arch.contents() if arch is not None else None
        self.qk_order = QK_ORDER.get(self.arch)

    def kind(self, name: str) -> str | None:
        """The tensor's GGML type name (``Q4_1``, ``Q8_0``, ``F32``...); None if absent."""
        t = self.tensors.get(name)
        return None if t is None else t.tensor_type.name

    def _raw(self, name: str, size: int) -> tuple[Tensor, int, int]:
        t = self.tensors[name]
        k, n = (int(x) for x in t.shape[:2])  # GGUF shapes are (inputs, outputs)
        return torch.from_numpy(t.data.reshape(n, k // BLOCK, size).copy()), n, k

    def q4(self, name: str) -> tuple[Tensor, Tensor] | None:
        """``(q (N, K/2) uint8, scales (N, 2, K/32) fp16)`` of a Q4_0/Q4_1 tensor in our
        int4 layout (scales ``d`` then ``m``); None for other types or a missing name."""
        kind = self.kind(name)
        if kind not in Q4_KINDS:
            return None
        size = 20 if kind == "Q4_1" else 18
        raw, n, k = self._raw(name, size)  # (N, K/32, bytes)
        d = _fp16(raw[..., 0:2])  # (N, K/32)
        if size == 20:
            m = _fp16(raw[..., 2:4])
            qs = raw[..., 4:20]
        else:
            m = d * -8.0  # (q - 8) * d = q * d + (-8 d); times 8 is exact in fp16
            qs = raw[..., 2:18]
        q = qs.reshape(n, k // 2).contiguous()
        scales = torch.stack([d, m], dim=1).contiguous()  # (N, 2, K/32)
        return q, scales

    def q8(self, name: str) -> tuple[Tensor, Tensor] | None:
        """``(q (N, K) int8, d (N, K/32) fp16)`` of a Q8_0 tensor; None for other types."""
        if self.kind(name) != "Q8_0":
            return None
        raw, n, k = self._raw(name, 2 + BLOCK)  # (N, K/32, 34)
        d = _fp16(raw[..., 0:2]).contiguous()
        q = raw[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return q, d

    def linear(
        self,
        names: list[str],
        bias: Tensor | None = None,
        rows: Sequence[Callable[[Tensor], Tensor] | None] | None = None,
    ) -> Linear | None:
        """The tensors ``names`` stacked by rows (a fused projection) as one quantised
        layer holding the file's blocks; None unless all are Q4_0/Q4_1 or all Q8_0.
        ``rows[i]``, where given, reorders the rows of tensor ``i`` (its blocks and
        scales alike)."""
        kinds = {self.kind(n) for n in names}
        if kinds <= set(Q4_KINDS):
            parts = [self.q4(n) for n in names]
            make = Int4Linear.from_blocks
        elif kinds == {"Q8_0"}:
            parts = [self.q8(n) for n in names]
            make = Int8Linear.from_blocks
        else:
            return None
        fix = list(rows or [None] * len(names))
        q = torch.cat([f(p[0]) if f else p[0] for p, f in zip(parts, fix, strict=True)])  # type: ignore[index]
        s = torch.cat([f(p[1]) if f else p[1] for p, f in zip(parts, fix, strict=True)])  # type: ignore[index]
        return make(q, s, bias)

    def embedding(self, name: str) -> BlockEmbedding | None:
        """A Q4_0/Q4_1/Q8_0 embedding table kept as its blocks; None for other types."""
        q8 = self.q8(name)
        if q8 is not None:
            return BlockEmbedding(q8[0], q8[1], None)
        q4 = self.q4(name)
        if q4 is not None:
            return BlockEmbedding(q4[0], q4[1][:, 0].contiguous(), q4[1][:, 1].contiguous())
        return None


class BlockEmbedding:
    """Token embeddings kept as a GGUF file's blocks, the looked-up rows expanded.

    ``q`` (V, K) int8 with ``m`` None (Q8_0: w = q * d), or (V, K/2) uint8 nibbles in
    GGUF order with ``m`` (Q4: w = q * d + m); ``d``, ``m`` (V, K/32) fp16. Each value
    is computed as llama.cpp's and transformers' dequantisation does (q * d exact in
    fp32, then + m), so a lookup equals the fp32 table bit for bit, at a quarter
    (Q8_0) or an eighth (Q4) of its memory.
    """

    def __init__(self, q: Tensor, d: Tensor, m: Tensor | None) -> None:
        self.q, self.d, self.m = q, d, m
        self.num_embeddings = q.shape[0]
        self.embedding_dim = d.shape[1] * BLOCK

    def __call__(self, ids: Tensor) -> Tensor:
        """ids (...) -> (..., K) fp32."""
        flat = ids.reshape(-1)
        q, d = self.q[flat], self.d[flat].float()  # (R, K or K/2), (R, K/32)
        r, nb = d.shape
        if self.m is None:
            vals = q.view(r, nb, BLOCK).float()
        else:  # byte j of a block: q[j] low nibble, q[j + 16] high
            q = q.view(r, nb, BLOCK // 2)
            vals = torch.cat([q & 15, q >> 4], dim=2).float()  # (R, nb, 32)
        w = vals * d[..., None]
        if self.m is not None:
            w = w + self.m[flat].float()[..., None]
        return w.view(*ids.shape, self.embedding_dim)

    @property
    def nbytes(self) -> int:
        parts = (self.q, self.d) if self.m is None else (self.q, self.d, self.m)
        return sum(t.numel() * t.element_size() for t in parts)


def source_gguf_weights(meta: Any, model_type: str) -> GGUFWeights | None:
    """The quantised blocks of the GGUF file a converted Llama-family model came from:
    None when it came from none, the file changed or moved, or it holds no Q4_0, Q4_1
    or Q8_0 tensor."""
    source = source_gguf(meta) if model_type != "gpt2" else None
    if source is None:
        return None
    weights = GGUFWeights(source)
    has_blocks = any(t.tensor_type.name in KINDS for t in weights.tensors.values())
    return weights if has_blocks else None
