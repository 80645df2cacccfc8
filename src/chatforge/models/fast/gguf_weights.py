"""A GGUF file's 4-bit weights, taken as they are into the fast path's int4 kernels.

llama.cpp's ``Q4_1`` block (32 inputs: fp16 scale ``d``, fp16 minimum ``m``, 16
bytes whose byte ``j`` holds ``q[j]`` in its low nibble and ``q[j + 16]`` in its
high one, ``w = q * d + m``) is exactly our int4 kernel's layout, and ``Q4_0``
(``w = (q - 8) * d``) is the same with ``m = -8 d`` (exact in fp16). So a GGUF
model quantised that way runs on our kernels with the very weights llama.cpp
runs: nothing is expanded to fp32 and quantised again (which adds error to a
model that was already 4-bit).

Row order: llama.cpp's converter stores ``attn_q``/``attn_k`` with each head's
rotary halves interleaved, which is the order our decoder uses too (see
``convert._interleave``), so rows are taken as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

BLOCK = 32  # inputs per block
Q4_KINDS = ("Q4_0", "Q4_1")


class GGUFWeights:
    """The tensors of one GGUF file (memory-mapped), by llama.cpp name."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        reader = gguf.GGUFReader(str(self.path))
        self.tensors = {t.name: t for t in reader.tensors}

    def q4(self, name: str) -> tuple[Tensor, Tensor] | None:
        """``(q (N, K/2) uint8, scales (N, 2, K/32) fp16)`` of a Q4_0/Q4_1 tensor in our
        int4 layout (scales ``d`` then ``m``); None for other types or a missing name."""
        t = self.tensors.get(name)
        if t is None or t.tensor_type.name not in Q4_KINDS:
            return None
        k, n = (int(x) for x in t.shape[:2])  # GGUF shapes are (inputs, outputs)
        size = 20 if t.tensor_type.name == "Q4_1" else 18
        raw = torch.from_numpy(t.data.reshape(n, k // BLOCK, size).copy())  # (N, K/32, bytes)
        d = raw[..., 0:2].contiguous().view(torch.float16)[..., 0]  # (N, K/32)
        if size == 20:
            m = raw[..., 2:4].contiguous().view(torch.float16)[..., 0]
            qs = raw[..., 4:20]
        else:
            m = d * -8.0  # (q - 8) * d = q * d + (-8 d); times 8 is exact in fp16
            qs = raw[..., 2:18]
        q = qs.reshape(n, k // 2).contiguous()
        scales = torch.stack([d, m], dim=1).contiguous()  # (N, 2, K/32)
        return q, scales

    def q4_rows(self, names: list[str]) -> tuple[Tensor, Tensor] | None:
        """Several Q4 tensors stacked by rows (a fused projection); None unless all are Q4."""
        parts = [self.q4(n) for n in names]
        if any(p is None for p in parts):
            return None
        return (
            torch.cat([p[0] for p in parts]).contiguous(),  # type: ignore[index]
            torch.cat([p[1] for p in parts]).contiguous(),  # type: ignore[index]
        )


def source_q4_weights(meta: Any, model_type: str) -> GGUFWeights | None:
    """The 4-bit blocks of the GGUF file a converted Llama-family model came from: None
    when it came from none, the file changed or moved, or it holds no Q4_0/Q4_1 tensor."""
    from chatforge.models.gguf import source_gguf

    source = source_gguf(meta) if model_type != "gpt2" else None
    if source is None:
        return None
    weights = GGUFWeights(source)
    has_q4 = any(t.tensor_type.name in Q4_KINDS for t in weights.tensors.values())
    return weights if has_q4 else None
