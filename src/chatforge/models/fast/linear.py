"""Linear layers for the fast path: dense (fp32/bf16) and weight-only int8 / int4.

Decoding one token is a matrix-vector product per weight: its cost is reading
the weights, so storing them in fewer bytes is what makes it faster. The
quantised layers run on our own kernels (``native.py``, ``kernels/qlinear.c``:
activations quantised per block of 32 to two int8 digits, integer dot products;
the weights repacked at load so that groups of 16 rows are interleaved, one
vector load feeding 16 output rows) for any number of rows: measured on 2 cores
(SmolLM2 shapes, 48 to 500 rows) they are ~2x faster than dequantising the weight
and an fp32 matmul, and a row's result is the same whatever the batch. Where the
kernels cannot be built, torch's kernels take over (``_weight_int8pack_mm``:
per-output-channel scales; ``_weight_int4pack_mm_for_cpu``: asymmetric groups),
with bf16 activations: their fp32 input paths are 10-20x slower (measured here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from chatforge.models.fast import native

QUANT_MODES = ("none", "int8", "int4")
GROUP = 16  # weight rows the kernels interleave (kinds 5, 8 and 9)


class DenseLinear:
    """y = x @ W^T + b with W stored (N, K) in the model dtype."""

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> None:
        self.weight = weight.detach().to(dtype).contiguous()  # (N, K)
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def rows(self, x: Tensor) -> Tensor:
        """``self(x)`` with each row computed alone, in a fixed order (batch-invariant).

        fp32 weights run on our C kernel (one reduction order whatever the number of
        rows); elsewhere this is the torch matmul.
        """
        if self.weight.dtype == torch.float32 and _native_ok(self.in_features):
            x = x.float().contiguous()
            return native.qlinear(32, x, self.weight, self.weight, self.bias, self.out_features)
        return self(x)

    @property
    def nbytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class QuantLinear:
    """Shared call path: our kernel (fp32) or torch's (bf16); result in the caller's dtype."""

    bias: Tensor | None  # fp32
    in_features: int
    out_features: int
    kind: int  # 9 | 8 | 5: the native kernel's layout (see kernels/qlinear.c)
    native: bool  # stored in the native kernel's layout
    weight_q: Tensor
    scales: Tensor

    def _torch_matmul(self, x: Tensor) -> Tensor:  # (M, K) bf16 -> (M, N) bf16
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        if self.native:
            y = self._native(x2.float().contiguous()).to(dtype)
        else:
            y = self._torch_matmul(_bf16(x2)).to(dtype)
            if self.bias is not None:
                y = y + self.bias.to(dtype)
        return y.view(*shape[:-1], self.out_features)

    def rows(self, x: Tensor) -> Tensor:
        """``self(x)`` in fp32, each row computed alone, in a fixed order (batch-invariant)
        on our kernel; torch's kernels where ours cannot run."""
        if not self.native:
            return self(x)
        return self._native(x.float().contiguous()).view(*x.shape[:-1], self.out_features)

    def _native(self, x: Tensor) -> Tensor:  # (M, K) fp32 -> (M, N) fp32
        return native.qlinear(
            self.kind, x, self.weight_q, self.scales, self.bias, self.out_features
        )

    def dequantize(self, out: Tensor | None = None) -> Tensor:
        """The fp32 (N, K) weight these integers stand for (into ``out`` when given)."""
        return native.dequantize(
            self.kind, self.weight_q, self.scales, self.out_features, self.in_features, out
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_q, self.scales))


def _pad_rows(t: Tensor) -> Tensor:
    """``t`` with zero rows appended up to a multiple of GROUP rows."""
    pad = -t.shape[0] % GROUP
    return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t


def repack_q4(q: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_1 blocks in GGUF order (``q`` (N, K/2) uint8, byte j of a block holding
    q[j] and q[j + 16]; ``scales`` (N, 2, K/32) fp16, d then m) -> kind 5: ``q``
    (G, K/32, 4, 16, 4), per group of 16 rows and block 4 chunks of 4 bytes a row,
    and ``scales`` (G, K/32, 2, 16), G = ceil(N / 16), zero rows padding the last."""
    nb = q.shape[1] // (native.QK // 2)
    q = _pad_rows(q).view(-1, GROUP, nb, 4, 4).permute(0, 2, 3, 1, 4).contiguous()
    scales = _pad_rows(scales).view(-1, GROUP, 2, nb).permute(0, 3, 2, 1).contiguous()
    return q, scales


def repack_q8(q: Tensor) -> Tensor:
    """int8 ``q`` (N, K) -> kind 9's (G, K/32, 8, 16, 4) uint8 of q + 128: per group of
    16 rows and block 8 chunks of 4 bytes a row (the kernel's unsigned operand)."""
    nb = q.shape[1] // native.QK
    u = q.view(torch.uint8) ^ 128  # q + 128 in the same byte
    return _pad_rows(u).view(-1, GROUP, nb, 8, 4).permute(0, 2, 3, 1, 4).contiguous()


def _native_ok(k: int) -> bool:
    return k % native.QK == 0 and native.available()


class Int8Linear(QuantLinear):
    """Weight-only int8, one scale per output channel (symmetric): w = q * s.

    Native layout (kind 9): ``repack_q8``'s interleaved groups, fp32 scales (N,).
    A GGUF file's Q8_0 blocks (one fp16 scale per 32 inputs) are taken as they are
    by :meth:`from_blocks` (kind 8)."""

    kind = 9

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        w = weight.detach().float()  # (N, K)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
        q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)  # (N, K)
        self.out_features, self.in_features = q.shape
        self.native = _native_ok(self.in_features)
        self.weight_q = repack_q8(q) if self.native else q.contiguous()
        # fp32 for our kernel, bf16 for torch's.
        self.scales = scale.contiguous() if self.native else scale.to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def _torch_matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_q, self.scales)

    @classmethod
    def from_blocks(cls, q: Tensor, d: Tensor, bias: Tensor | None = None) -> Int8Linear:
        """A layer holding Q8_0 blocks as they are: ``q`` (N, K) int8, ``d`` (N, K/32)
        fp16, w = q * d (kind 8: ``repack_q8``'s interleaved groups, ``d`` as (G, K/32,
        16)). Where our kernel cannot run, the blocks are expanded and quantised per
        channel for torch's."""
        n, k = q.shape
        if not _native_ok(k):
            w = q.float().view(n, k // native.QK, native.QK) * d.float()[..., None]
            return cls(w.view(n, k), bias)
        layer = cls.__new__(cls)
        layer.kind = 8
        layer.out_features, layer.in_features = n, k
        layer.native = True
        layer.weight_q = repack_q8(q.contiguous())
        layer.scales = _pad_rows(d.to(torch.float16)).view(-1, GROUP, k // native.QK)
        layer.scales = layer.scales.transpose(1, 2).contiguous()  # (G, K/32, 16)
        layer.bias = None if bias is None else bias.detach().float().contiguous()
        return layer


class Int4Linear(QuantLinear):
    """Weight-only int4, asymmetric groups of ``group_size`` inputs: w = q * d + m, q in 0..15.

    Each group's min/max range is mapped onto the 16 levels. Native layout (kind
    5): Q4_1 blocks (fp16 scale d and offset m per 32 inputs) repacked by
    ``repack_q4``. torch's layout: its own packing and (K/g, N, 2) bf16 (scale,
    zero) pairs with w = (q - 8) * scale + zero.
    """

    kind = 5

    def __init__(self, weight: Tensor, bias: Tensor | None, group_size: int = 32) -> None:
        w = weight.detach().float()  # (N, K)
        n, k = w.shape
        if k % group_size:
            raise ValueError(
                f"in_features {k} is not a multiple of the int4 group size {group_size}"
            )
        self.out_features, self.in_features = n, k
        self.group_size = group_size
        self.native = group_size == native.QK and _native_ok(k)
        groups = w.view(n, k // group_size, group_size)
        lo = groups.amin(dim=-1, keepdim=True)
        hi = groups.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)  # (N, K/g, 1)
        q = torch.round((groups - lo) / scale).clamp(0, 15).to(torch.uint8)  # (N, K/g, g)
        if self.native:
            half = group_size // 2
            blocks = (q[..., :half] | (q[..., half:] << 4)).reshape(n, k // 2)  # GGUF order
            dm = torch.stack([scale[..., 0], lo[..., 0]], dim=1).half()  # (N, 2, K/g)
            self.weight_q, self.scales = repack_q4(blocks, dm)
        else:
            zero = lo + 8.0 * scale
            self.scales = (
                torch.cat([scale, zero], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)
            )  # (K/g, N, 2)
            self.weight_q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.view(n, k).to(torch.int32), 2
            )
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def _torch_matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.weight_q, self.group_size, self.scales
        )

    @classmethod
    def from_blocks(cls, q: Tensor, scales: Tensor, bias: Tensor | None = None) -> Int4Linear:
        """A layer holding given blocks: ``q`` (N, K/2) uint8, ``scales`` (N, 2, K/32)
        fp16 (``d`` then ``m``; a GGUF Q4_1/Q4_0 tensor as is), repacked for our kernel
        (the same numbers, moved). Where it cannot run, the blocks are expanded and
        quantised for torch's."""
        n, k = q.shape[0], q.shape[1] * 2
        if not _native_ok(k):
            lo = torch.stack([q & 15, q >> 4], dim=1)  # (N, 2, K/2): q[j], q[j+16] per block
            vals = lo.view(n, 2, k // native.QK, native.QK // 2).permute(0, 2, 1, 3)
            vals = vals.reshape(n, k // native.QK, native.QK).float()  # (N, K/32, 32)
            d, m = scales[:, 0].float(), scales[:, 1].float()  # (N, K/32)
            w = (vals * d[..., None] + m[..., None]).reshape(n, k)
            return cls(w, bias)
        layer = cls.__new__(cls)
        layer.out_features, layer.in_features = n, k
        layer.group_size = native.QK
        layer.native = True
        layer.weight_q, layer.scales = repack_q4(q, scales.to(torch.float16))
        layer.bias = None if bias is None else bias.detach().float().contiguous()
        return layer


Linear = DenseLinear | Int8Linear | Int4Linear


def _bf16(x: Tensor) -> Tensor:
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)


def make_linear(
    weight: Tensor,
    bias: Tensor | None,
    dtype: torch.dtype,
    quantize: str = "none",
    group_size: int = 32,
) -> Linear:
    """A linear layer from an (N, K) weight in the requested storage."""
    if quantize == "none":
        return DenseLinear(weight, bias, dtype)
    if quantize == "int8":
        return Int8Linear(weight, bias)
    if quantize == "int4":
        if weight.shape[1] % group_size or weight.shape[0] % 16:
            return Int8Linear(weight, bias)  # shapes the int4 kernel can't take stay int8
        return Int4Linear(weight, bias, group_size)
    raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANT_MODES)}")
