"""The fast decoder's weight layout, shared by what builds, saves and adapts it.

Our decoder fuses projections (Q, K and V in one linear; gate and up in one), so a
layer has four linears, :data:`LINEARS`, in the order ``kernels/decode.c`` indexes
them. A Llama's Q/K rows are kept with each head's rotary halves interleaved
(:func:`interleave`): the converter reorders transformers' weights that way, and a
LoRA adapter's B rows and a Qwen2 GGUF file's Q/K blocks are reordered to match.
"""

from __future__ import annotations

import torch

LINEARS = ("qkv", "out", "up", "down")  # a layer's linears, in decode.c's order


def interleave(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from (0..D/2-1, D/2..D-1) to (0, D/2, 1, D/2+1, ...).

    transformers rotates feature i with feature i + D/2; adjacent pairs let the
    rotation be one complex multiply. Works on (H*D, K) weights and (H*D,) biases.
    """
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    shape = t.shape
    return t.reshape(n_heads, head_dim, -1)[:, perm].reshape(shape)
