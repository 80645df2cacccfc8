"""Linear layers for the fast path: dense (fp32/bf16) and weight-only int8 / int4.

Decoding one token is a matrix-vector product per weight: its cost is reading
the weights, so storing them in fewer bytes is what makes it faster. The
quantised layers use torch's CPU kernels (``_weight_int8pack_mm``:
per-output-channel scales; ``_weight_int4pack_mm_for_cpu``: asymmetric groups
along the input dimension) with bf16 activations: measured here, their fp32
input paths are 10-20x slower than the bf16 ones (and slower than a dense fp32
matmul), so fp32 activations are cast to bf16 around each call.
"""

from __future__ import annotations

import torch
from torch import Tensor

QUANT_MODES = ("none", "int8", "int4")


class DenseLinear:
    """y = x @ W^T + b with W stored (N, K) in the model dtype."""

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> None:
        self.weight = weight.detach().to(dtype).contiguous()  # (N, K)
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class _QuantLinear:
    """Shared call path: bf16 (M, K) into the kernel, result back in the caller's dtype."""

    bias: Tensor | None
    out_features: int

    def _matmul(self, x: Tensor) -> Tensor:  # (M, K) bf16 -> (M, N) bf16
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        y = self._matmul(_bf16(x).reshape(-1, shape[-1])).to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.view(*shape[:-1], self.out_features)


class Int8Linear(_QuantLinear):
    """Weight-only int8, one fp32 scale per output channel (symmetric)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        w = weight.detach().float()  # (N, K)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
        self.qweight = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.out_features, self.in_features = self.qweight.shape

    def _matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scale.numel() * 2


class Int4Linear(_QuantLinear):
    """Weight-only int4, asymmetric groups of ``group_size`` input features.

    torch's kernel computes w = (q - 8) * scale + zero for q in [0, 15]; we fit
    q from each group's min/max so the group's range maps onto the 16 levels.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, group_size: int = 32) -> None:
        w = weight.detach().float()  # (N, K)
        n, k = w.shape
        if k % group_size:
            raise ValueError(
                f"in_features {k} is not a multiple of the int4 group size {group_size}"
            )
        groups = w.view(n, k // group_size, group_size)
        lo = groups.amin(dim=-1, keepdim=True)
        hi = groups.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)  # (N, K/g, 1)
        q = torch.round((groups - lo) / scale).clamp(0, 15).to(torch.int32).view(n, k)
        zero = lo + 8.0 * scale
        # (K/g, N, 2): the layout the kernel expects.
        self.scale_zeros = (
            torch.cat([scale, zero], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)
        )
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        self.group_size = group_size
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.out_features, self.in_features = n, k

    def _matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scale_zeros
        )

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scale_zeros.numel() * 2


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
