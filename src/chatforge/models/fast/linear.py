"""Linear layers for the fast path: dense (fp32/bf16) and weight-only int8 / int4.

Decoding one token is a matrix-vector product per weight: its cost is reading
the weights, so storing them in fewer bytes is what makes it faster. The
quantised layers run on our own kernels (``native.py``: activations quantised
to int8 per block of 32, integer dot products, ~2x torch's int8 kernel at
batch 1) for up to ``DENSE_ROWS`` rows; a longer input (a prompt being
prefilled) multiplies a dequantised fp32 copy of the weight, made per call, so
prefill runs at dense-matmul speed. Where the kernels cannot be built, torch's
kernels take over (``_weight_int8pack_mm``: per-output-channel scales;
``_weight_int4pack_mm_for_cpu``: asymmetric groups), with bf16 activations:
their fp32 input paths are 10-20x slower (measured here).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from chatforge.models.fast import native

QUANT_MODES = ("none", "int8", "int4")
# Rows (tokens) from which a dequantise-then-dense-matmul beats the integer
# kernel (measured on a 2-core AVX2 CPU with SmolLM2 shapes; see bench/).
DENSE_ROWS = 48
MAX_NATIVE_K = 32768  # the kernel's per-row block buffer
SCRATCH_MAX = 8 * 2**20  # floats: largest dequantised weight kept for reuse (32 MB)


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
            return native.qlinear(32, x.float().contiguous(), self.weight, self.weight, self.bias)
        return self(x)

    @property
    def nbytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class _QuantLinear:
    """Shared call path: our kernel (fp32) or torch's (bf16); result in the caller's dtype."""

    bias: Tensor | None  # fp32
    in_features: int
    out_features: int
    kind: int  # 8 | 4: the native kernel's layout
    native: bool  # stored in the native kernel's layout
    weight_q: Tensor
    scales: Tensor

    def _torch_matmul(self, x: Tensor) -> Tensor:  # (M, K) bf16 -> (M, N) bf16
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        if self.native:
            x2 = x2.float().contiguous()
            if x2.shape[0] >= DENSE_ROWS:
                y = F.linear(
                    x2, self.dequantize(_scratch(self.out_features, self.in_features)), self.bias
                )
            else:
                y = native.qlinear(self.kind, x2, self.weight_q, self.scales, self.bias)
            y = y.to(dtype)
        else:
            y = self._torch_matmul(_bf16(x2)).to(dtype)
            if self.bias is not None:
                y = y + self.bias.to(dtype)
        return y.view(*shape[:-1], self.out_features)

    def rows(self, x: Tensor) -> Tensor:
        """``self(x)`` with each row computed alone, in a fixed order (batch-invariant):
        our integer kernel whatever the number of rows (no dequantised matmul)."""
        if not self.native:
            return self(x)
        y = native.qlinear(self.kind, x.float().contiguous(), self.weight_q, self.scales, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self, out: Tensor | None = None) -> Tensor:
        """The fp32 (N, K) weight these integers stand for (into ``out`` when given)."""
        return native.dequantize(self.kind, self.weight_q, self.scales, self.in_features, out)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_q, self.scales))


_buffers = threading.local()


def _scratch(n: int, k: int) -> Tensor:
    """A reused (N, K) fp32 buffer per thread: a fresh 7 MB allocation per layer and
    prompt costs page faults that showed in time to first token."""
    if n * k > SCRATCH_MAX:  # e.g. an LM head scoring every position: not kept
        return torch.empty((n, k), dtype=torch.float32)
    bufs = getattr(_buffers, "by_shape", None)
    if bufs is None:
        bufs = _buffers.by_shape = {}
    buf = bufs.get((n, k))
    if buf is None:
        buf = bufs[(n, k)] = torch.empty((n, k), dtype=torch.float32)
    return buf


def _native_ok(k: int) -> bool:
    return k % native.QK == 0 and k <= MAX_NATIVE_K and native.available()


class Int8Linear(_QuantLinear):
    """Weight-only int8, one scale per output channel (symmetric): w = q * s."""

    kind = 8

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        w = weight.detach().float()  # (N, K)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
        self.weight_q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        self.out_features, self.in_features = self.weight_q.shape
        self.native = _native_ok(self.in_features)
        # fp32 for our kernel, bf16 for torch's.
        self.scales = scale.contiguous() if self.native else scale.to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def _torch_matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_q, self.scales)


class Int4Linear(_QuantLinear):
    """Weight-only int4, asymmetric groups of ``group_size`` inputs: w = q * d + m, q in 0..15.

    Each group's min/max range is mapped onto the 16 levels. Native layout: q
    (N, K/2) uint8, byte j of a 32-input block holding q[j] and q[j + 16], with
    fp16 (N, 2, K/32) scales d then offsets m. torch's layout: its own packing
    and (K/g, N, 2) bf16 (scale, zero) pairs with w = (q - 8) * scale + zero.
    """

    kind = 4

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
            self.weight_q = (q[..., :half] | (q[..., half:] << 4)).reshape(n, k // 2).contiguous()
            self.scales = torch.stack([scale[..., 0], lo[..., 0]], dim=1).half().contiguous()
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
        """A layer holding given blocks in the native layout: ``q`` (N, K/2) uint8,
        ``scales`` (N, 2, K/32) fp16 (``d`` then ``m``; a GGUF Q4_1/Q4_0 tensor as is).
        Where our kernel cannot run, the blocks are expanded and quantised for torch's."""
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
        layer.weight_q = q.contiguous()
        layer.scales = scales.to(torch.float16).contiguous()
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
