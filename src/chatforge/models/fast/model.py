"""A compact decoder for the fast path: Llama family (RMSNorm, RoPE, GQA, gated
SiLU MLP) and GPT-2 (LayerNorm, learned positions, GELU MLP) on one code path.

What makes it fast on a CPU, next to transformers' modules:

* fused projections: one matmul for Q, K and V, one for gate and up;
* a preallocated KV cache per layer, (slots, kv_heads, capacity, head_dim),
  written in place at each sequence's own position (never grown per token);
* attention over the filled length only, GQA without repeating K/V (the
  query heads of a group become the "length" dimension of one attention call);
* the LM head only on the last position of each sequence;
* weight-only int8/int4 linears (see ``linear.py``).

Row ``i`` of a decode batch is cache slot ``i``; the runner keeps the running
sequences in slots ``0..B-1`` (see ``generation/fast_runner.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from chatforge.models.fast.linear import Linear


@dataclass
class FastConfig:
    """Shape and flavour of a fast-path decoder."""

    arch: str  # "llama" | "gpt2"
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int  # context length
    eps: float  # norm epsilon
    dtype: torch.dtype = torch.float32  # activations and dense weights
    quantize: str = "none"  # "none" | "int8" | "int4"

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass
class Norm:
    """RMSNorm (bias None, Llama) or LayerNorm (GPT-2)."""

    weight: Tensor
    bias: Tensor | None
    eps: float
    rms: bool

    def __call__(self, x: Tensor) -> Tensor:
        # One fused op each (fewer ops per token is most of the fast path's win).
        if self.rms:
            if x.dtype == torch.float32:
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            # bf16: normalise in fp32 and scale in bf16, exactly as transformers does.
            return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * self.weight
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


@dataclass
class Layer:
    """One transformer block's weights."""

    norm1: Norm
    qkv: Linear  # hidden -> (n_heads + 2 * n_kv_heads) * head_dim
    out: Linear  # n_heads * head_dim -> hidden
    norm2: Norm
    up: Linear  # llama: hidden -> 2 * intermediate (gate, up); gpt2: hidden -> intermediate
    down: Linear  # intermediate -> hidden


@dataclass
class KVCache:
    """Per-layer K and V, (slots, kv_heads, capacity, head_dim), plus filled lengths."""

    k: list[Tensor]
    v: list[Tensor]
    lens: Tensor  # (slots,) long: positions filled per slot
    # Where the C decode step finds these tensors (native_decode.py).
    native: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, cfg: FastConfig, slots: int = 1, capacity: int = 256) -> KVCache:
        shape = (slots, cfg.n_kv_heads, min(capacity, cfg.max_positions), cfg.head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=cfg.dtype) for _ in range(cfg.n_layers)],
            v=[torch.zeros(shape, dtype=cfg.dtype) for _ in range(cfg.n_layers)],
            lens=torch.zeros(slots, dtype=torch.long),
        )

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @torch.inference_mode()
    def ensure(self, slots: int, capacity: int, limit: int) -> None:
        """Grow (doubling, so rarely) to hold ``slots`` sequences of ``capacity`` positions."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        new_slots = self.slots if slots <= self.slots else max(slots, 2 * self.slots)
        new_cap = self.capacity
        if capacity > new_cap:
            new_cap = max(capacity, min(2 * new_cap, limit))
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                s, h, c, d = t.shape
                grown = torch.zeros((new_slots, h, new_cap, d), dtype=t.dtype)
                grown[:s, :, :c] = t
                store[i] = grown
        lens = torch.zeros(new_slots, dtype=torch.long)
        lens[: self.lens.shape[0]] = self.lens
        self.lens = lens

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into slot ``dst`` (filled positions only)."""
        n = int(self.lens[src])
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :n] = t[src, :, :n]
        self.lens[dst] = n
        self.lens[src] = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@dataclass
class FastDecoder:
    """The forward pass of a supported architecture, over a slot KV cache."""

    cfg: FastConfig
    embed: Tensor  # (V, hidden) token embeddings
    layers: list[Layer]
    norm: Norm  # final norm
    head: Linear  # hidden -> vocab
    pos_embed: Tensor | None = None  # (max_positions, hidden): GPT-2's learned positions
    # Llama's rotary embedding as complex rotations, (max_positions, head_dim / 2).
    # The converter permutes each head's Q/K rows so that the pairs transformers
    # rotates together, (i, i + D/2), are adjacent; Q.K is unchanged by that.
    rope: Tensor | None = None
    # The C decode step (native_decode.py): None until first asked, False where
    # it does not apply.
    native: Any = field(default=None, repr=False)

    def new_cache(self) -> KVCache:
        """An empty cache for this model (grows as sequences need)."""
        return KVCache.empty(self.cfg)

    # -- pieces ---------------------------------------------------------------------

    def _embed(self, tokens: Tensor, positions: Tensor, types: Tensor | None) -> Tensor:
        x = F.embedding(tokens, self.embed)  # (B, T, hidden)
        if self.pos_embed is not None:
            x = x + F.embedding(positions, self.pos_embed)
        if types is not None:  # GPT-2 token types share the token embedding table
            x = x + F.embedding(types, self.embed)
        return x.to(self.cfg.dtype)

    def _qkv(self, layer: Layer, h: Tensor, freqs: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Q (B, H, T, D), K and V (B, Hkv, T, D), rotated; freqs (B, T, D/2) complex."""
        cfg = self.cfg
        b, t, _ = h.shape
        hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = layer.qkv(h).to(cfg.dtype)  # (B, T, (H + 2 Hkv) D)
        nqk = (hq + hkv) * d
        qk, v = qkv[..., :nqk], qkv[..., nqk:]
        if freqs is not None:  # rotate Q and K together: one complex multiply
            pairs = torch.view_as_complex(qk.float().reshape(b, t, hq + hkv, d // 2, 2))
            qk = torch.view_as_real(pairs * freqs.unsqueeze(2)).reshape(b, t, nqk).to(cfg.dtype)
        q = qk[..., : hq * d].reshape(b, t, hq, d).transpose(1, 2)
        k = qk[..., hq * d :].reshape(b, t, hkv, d).transpose(1, 2)
        return q, k, v.reshape(b, t, hkv, d).transpose(1, 2)

    def _mlp(self, layer: Layer, h: Tensor) -> Tensor:
        u = layer.up(h).to(self.cfg.dtype)
        if self.cfg.arch == "llama":
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = F.gelu(u, approximate="tanh")
        return layer.down(u).to(self.cfg.dtype)

    def _logits(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x)).float()  # (B, V)

    # -- passes ---------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        tokens: Tensor,
        slot: int,
        cache: KVCache,
        types: Tensor | None = None,
        all_logits: bool = False,
    ) -> Tensor:
        """Run one prompt (T,) into ``slot`` from position 0; return its last logits (V,).

        With ``all_logits`` the logits of every position, (T, V), for scoring text.
        """
        cfg = self.cfg
        n = tokens.shape[0]
        cache.ensure(slot + 1, n + 1, cfg.max_positions)
        positions = torch.arange(n).unsqueeze(0)  # (1, T)
        x = self._embed(tokens.unsqueeze(0), positions, None if types is None else types[None])
        freqs = None if self.rope is None else self.rope[positions]  # (1, T, D/2)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.norm1(x), freqs)
            cache.k[i][slot, :, :n] = k[0]
            cache.v[i][slot, :, :n] = v[0]
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.group > 1)
            x = x + layer.out(a.transpose(1, 2).reshape(1, n, -1)).to(cfg.dtype)
            x = x + self._mlp(layer, layer.norm2(x))
        cache.lens[slot] = n
        if all_logits:
            return self._logits(x[0])
        return self._logits(x[0, -1:])[0]

    @torch.inference_mode()
    def prefill_batch(
        self,
        tokens: Tensor,
        lengths: Tensor,
        first_slot: int,
        cache: KVCache,
        types: Tensor | None = None,
    ) -> Tensor:
        """Prompts (B, T), right-padded to T, into slots ``first_slot..+B``; last logits (B, V).

        Right padding keeps every real token at its own position 0..n-1, and causal
        attention never lets a real token see the padding after it; the cache rows
        past each length hold junk that ``lens`` excludes and decoding overwrites.
        One pass reads the weights once for all prompts.
        """
        cfg = self.cfg
        b, t = tokens.shape
        cache.ensure(first_slot + b, t + 1, cfg.max_positions)
        positions = torch.arange(t).unsqueeze(0).expand(b, t)  # (B, T)
        x = self._embed(tokens, positions, types)
        freqs = None if self.rope is None else self.rope[:t].unsqueeze(0)  # (1, T, D/2)
        rows = slice(first_slot, first_slot + b)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.norm1(x), freqs)
            cache.k[i][rows, :, :t] = k
            cache.v[i][rows, :, :t] = v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.group > 1)
            x = x + layer.out(a.transpose(1, 2).reshape(b, t, -1)).to(cfg.dtype)
            x = x + self._mlp(layer, layer.norm2(x))
        cache.lens[rows] = lengths
        last = x[torch.arange(b), lengths - 1]  # (B, hidden): each prompt's last real token
        return self._logits(last)

    @torch.inference_mode()
    def decode(self, tokens: Tensor, cache: KVCache, types: Tensor | None = None) -> Tensor:
        """One token for each of slots 0..B-1 (B = len(tokens)); returns logits (B, V)."""
        cfg = self.cfg
        b = tokens.shape[0]
        pos = cache.lens[:b].clone()  # (B,) position of the new token per slot
        length = int(pos.max()) + 1  # attend over the filled length only
        cache.ensure(b, length, cfg.max_positions)
        x = self._embed(
            tokens.view(b, 1), pos.view(b, 1), None if types is None else types.view(b, 1)
        )
        if self.native is None:
            from chatforge.models.fast.native_decode import NativeDecode

            self.native = NativeDecode.build(self) or False
        if self.native:
            x = x.view(b, cfg.hidden).contiguous()
            self.native.run(x, pos, cache)
            cache.lens[:b] = pos + 1
            return self._logits(x)
        rows = torch.arange(b)
        if b == 1:
            mask = None
        else:  # (B, 1, 1, L): each row sees its own filled positions
            mask = (torch.arange(length).unsqueeze(0) <= pos.unsqueeze(1)).view(b, 1, 1, length)
        g, hkv, d = cfg.group, cfg.n_kv_heads, cfg.head_dim
        freqs = None if self.rope is None else self.rope[pos].view(b, 1, -1)  # (B, 1, D/2)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.norm1(x), freqs)
            if b == 1:
                p = int(pos[0])
                cache.k[i][0, :, p] = k[0, :, 0]
                cache.v[i][0, :, p] = v[0, :, 0]
            else:
                cache.k[i][rows, :, pos] = k[:, :, 0]  # (B, Hkv, D) written in place
                cache.v[i][rows, :, pos] = v[:, :, 0]
            kk = cache.k[i][:b, :, :length]  # (B, Hkv, L, D) views, no copy
            vv = cache.v[i][:b, :, :length]
            # GQA: the G query heads of a KV head act as G query positions.
            a = F.scaled_dot_product_attention(
                q.reshape(b, hkv, g, d), kk, vv, attn_mask=mask, scale=1.0 / math.sqrt(d)
            )  # (B, Hkv, G, D)
            x = x + layer.out(a.reshape(b, 1, hkv * g * d)).to(cfg.dtype)
            x = x + self._mlp(layer, layer.norm2(x))
        cache.lens[:b] = pos + 1
        return self._logits(x[:, -1])

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights read per decoded token (embeddings excluded: only looked up)."""
        total = sum(
            lin.nbytes
            for layer in self.layers
            for lin in (layer.qkv, layer.out, layer.up, layer.down)
        )
        return total + self.head.nbytes
