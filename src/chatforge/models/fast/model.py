"""A compact decoder for the fast path: Llama family (RMSNorm, RoPE, GQA, gated
SiLU MLP) and GPT-2 (LayerNorm, learned positions, GELU MLP) on one code path.

What makes it fast on a CPU, next to transformers' modules:

* fused projections: one matmul for Q, K and V, one for gate and up;
* a paged KV cache (blocks of positions, shared between sequences with a
  common prefix), written in place at each row's own position;
* attention over the filled length only, GQA without repeating K/V (the
  query heads of a group become the "length" dimension of one attention call);
* the LM head only on the last position of each sequence;
* weight-only int8/int4 linears (see ``linear.py``).

One :meth:`FastDecoder.forward` runs any set of rows (a decode step, prefill
chunks, or both); with fp32 activations it is one C call (``kernels/decode.c``)
whose per-row results do not depend on the other rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from chatforge.models.fast.linear import Linear
from chatforge.models.fast.lora import stacked, torch_delta
from chatforge.models.fast.native_decode import NativeDecode


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
class PagedKV:
    """The KV cache as a pool of blocks: per layer K and V, (n_blocks, kv_heads, block, head_dim).

    A sequence's positions live in the blocks of its block table (position p in
    block ``table[p // block]`` at offset ``p % block``), so sequences share
    blocks of a common prefix without copying (the engine's prefix cache) and
    memory is taken a block at a time. The pool grows (doubling) as the engine
    needs blocks, up to its memory budget; growing copies the filled blocks.
    """

    k: list[Tensor]
    v: list[Tensor]
    block_size: int
    # Where the C forward step finds these tensors (native_decode.py).
    native: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(
        cls, cfg: FastConfig, n_blocks: int, block_size: int, device: torch.device | str = "cpu"
    ) -> PagedKV:
        shape = (n_blocks, cfg.n_kv_heads, block_size, cfg.head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=cfg.dtype, device=device) for _ in range(cfg.n_layers)],
            v=[torch.zeros(shape, dtype=cfg.dtype, device=device) for _ in range(cfg.n_layers)],
            block_size=block_size,
        )

    @staticmethod
    def bytes_per_block(cfg: FastConfig, block_size: int) -> int:
        """Bytes one block takes over all layers (K and V)."""
        elem = torch.empty((), dtype=cfg.dtype).element_size()
        return 2 * cfg.n_layers * cfg.n_kv_heads * block_size * cfg.head_dim * elem

    @property
    def n_blocks(self) -> int:
        return self.k[0].shape[0]

    @torch.inference_mode()
    def grow(self, n_blocks: int) -> None:
        """Hold at least ``n_blocks`` blocks (block ids and contents are kept)."""
        if n_blocks <= self.n_blocks:
            return
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                # finite everywhere; on the pool's own device
                grown = torch.zeros((n_blocks, *t.shape[1:]), dtype=t.dtype, device=t.device)
                grown[: t.shape[0]] = t
                store[i] = grown

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def _move(obj: object, device: torch.device) -> None:
    """Move the tensors of ``obj`` (a decoder, layer, norm, linear or LoRA delta, and the
    lists of them it holds) to ``device``, in place."""
    for name, v in list(vars(obj).items()):
        if isinstance(v, Tensor):
            setattr(obj, name, v.to(device))
        elif isinstance(v, list):
            for item in v:
                if hasattr(item, "__dict__") and not isinstance(item, Tensor):
                    _move(item, device)
        elif isinstance(v, (Layer, Norm)) or type(v).__name__ in ("DenseLinear", "LoraLinear"):
            _move(v, device)


@dataclass
class _Lora:
    """The torch path's per-layer adapter context: layer index, (B,) slot per sequence."""

    layer: int
    slots: Tensor


@dataclass
class FastDecoder:
    """The forward pass of a supported architecture, over a paged KV cache."""

    cfg: FastConfig
    # (V, hidden) token embeddings, or a GGUF file's blocks (gguf_weights.BlockEmbedding)
    embed: Any
    layers: list[Layer]
    norm: Norm  # final norm
    head: Linear  # hidden -> vocab
    pos_embed: Tensor | None = None  # (max_positions, hidden): GPT-2's learned positions
    # Llama's rotary embedding as complex rotations, (max_positions, head_dim / 2).
    # The converter permutes each head's Q/K rows so that the pairs transformers
    # rotates together, (i, i + D/2), are adjacent; Q.K is unchanged by that.
    rope: Tensor | None = None
    # The C forward step (native_decode.py), chosen once when the model is built;
    # None where it does not apply (bf16, no C compiler): the torch path runs.
    native: Any = field(default=None, repr=False)
    # LoRA adapters applied per row (lora.py), in slot order; a row names its slot.
    adapters: list[Any] = field(default_factory=list, repr=False)
    # The adapter of a LoRA directory loaded as a model: applied to every row that
    # names no other (slot -1), on the base's own weights, so its numbers are those
    # of the same adapter named per request on the base. Not one of ``adapters``
    # (requests cannot name or remove it; an adapter added is stacked on it); its
    # slot is the last one.
    own_adapter: Any = field(default=None, repr=False)
    _lora_table: Any = field(default=None, repr=False)  # their C view (native_decode.py)

    def add_adapter(self, adapter: Any) -> None:
        """Make a :class:`~chatforge.models.fast.lora.LoraAdapter` available to rows
        (replacing one of the same name); the caller makes sure no row runs meanwhile.
        On a model with its own adapter, rows naming this one run both (stacked)."""
        if self.own_adapter is not None:
            adapter = stacked(self.own_adapter, adapter)
        self.adapters = [a for a in self.adapters if a.name != adapter.name] + [adapter]
        self._rebuild_lora_table()

    def set_own_adapter(self, adapter: Any) -> None:
        """Apply ``adapter`` to every row that names no adapter (see ``own_adapter``)."""
        self.own_adapter = adapter
        self._rebuild_lora_table()

    @property
    def _slots(self) -> list[Any]:
        """The adapters by slot: the named ones, then the model's own (if any)."""
        own = self.own_adapter
        return self.adapters if own is None else [*self.adapters, own]

    def remove_adapter(self, name: str) -> bool:
        """Forget adapter ``name``; True if it was there (slots of later ones shift)."""
        kept = [a for a in self.adapters if a.name != name]
        if len(kept) == len(self.adapters):
            return False
        self.adapters = kept
        self._rebuild_lora_table()
        return True

    def adapter_slot(self, name: str) -> int:
        """The slot rows of adapter ``name`` pass to :meth:`forward` (KeyError if absent)."""
        for i, a in enumerate(self.adapters):
            if a.name == name:
                return i
        raise KeyError(name)

    def _rebuild_lora_table(self) -> None:
        self._lora_table = NativeDecode.lora_table(self._slots, self.cfg.n_layers)

    def new_cache(self, n_blocks: int = 16, block_size: int = 16) -> PagedKV:
        """An empty paged KV cache for this model, on its device (the engine grows it)."""
        return PagedKV.empty(self.cfg, n_blocks, block_size, self.device)

    @property
    def device(self) -> torch.device:
        """Where the weights are (and where :meth:`forward` wants its index tensors)."""
        return self.norm.weight.device

    def to(self, device: torch.device | str) -> FastDecoder:
        """Move every weight (and the adapters) to ``device``, in place; returns self.

        Only dense weights move: the C step and our int8/int4 kernels are CPU code, so
        a decoder leaving the CPU must have neither (``native`` is dropped)."""
        device = torch.device(device)
        if device.type != "cpu":
            if self.cfg.quantize != "none" or not isinstance(self.embed, Tensor):
                raise ValueError(
                    f"quantised weights ({self.cfg.quantize}) run on the CPU only; "
                    "load the model with quantize='none' for a GPU"
                )
            self.native = None
        _move(self, device)
        for adapter in (*self.adapters, self.own_adapter):
            if adapter is not None:
                for layer in adapter.layers:
                    for delta in layer.values():
                        _move(delta, device)
        self._rebuild_lora_table()
        return self

    @property
    def kernel_path(self) -> str:
        """Which code runs the layers: ``c`` (one C call per step) or ``torch``."""
        return "c" if self.native else "torch"

    # -- pieces ---------------------------------------------------------------------

    def _lookup(self, ids: Tensor) -> Tensor:
        e = self.embed
        return F.embedding(ids, e) if isinstance(e, Tensor) else e(ids)  # (_embed casts)

    def _embed(self, tokens: Tensor, positions: Tensor, types: Tensor | None) -> Tensor:
        x = self._lookup(tokens)  # (B, T, hidden)
        if self.pos_embed is not None:
            x = x + F.embedding(positions, self.pos_embed)
        if types is not None:  # GPT-2 token types share the token embedding table
            x = x + self._lookup(types)
        return x.to(self.cfg.dtype)

    def _lin(self, layer: Layer, name: str, h: Tensor, lora: _Lora | None) -> Tensor:
        """Linear ``name`` of ``layer`` over (B, T, K) rows, plus each sequence's
        adapter delta (``lora``: the layer's index and each sequence's slot)."""
        y = getattr(layer, name)(h).to(self.cfg.dtype)
        if lora is not None:
            for slot in lora.slots.unique().tolist():
                delta = self._slots[slot].layers[lora.layer].get(name) if slot >= 0 else None
                if delta is not None:
                    rows = lora.slots == slot  # (B,) sequences with this adapter
                    y[rows] = y[rows] + torch_delta(delta, h[rows])
        return y

    def _qkv(
        self, layer: Layer, h: Tensor, freqs: Tensor | None, lora: _Lora | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Q (B, H, T, D), K and V (B, Hkv, T, D), rotated; freqs (B, T, D/2) complex."""
        cfg = self.cfg
        b, t, _ = h.shape
        hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = self._lin(layer, "qkv", h, lora)  # (B, T, (H + 2 Hkv) D)
        nqk = (hq + hkv) * d
        qk, v = qkv[..., :nqk], qkv[..., nqk:]
        if freqs is not None:  # rotate Q and K together: one complex multiply
            pairs = torch.view_as_complex(qk.float().reshape(b, t, hq + hkv, d // 2, 2))
            qk = torch.view_as_real(pairs * freqs.unsqueeze(2)).reshape(b, t, nqk).to(cfg.dtype)
        q = qk[..., : hq * d].reshape(b, t, hq, d).transpose(1, 2)
        k = qk[..., hq * d :].reshape(b, t, hkv, d).transpose(1, 2)
        return q, k, v.reshape(b, t, hkv, d).transpose(1, 2)

    def _mlp(self, layer: Layer, h: Tensor, lora: _Lora | None = None) -> Tensor:
        u = self._lin(layer, "up", h, lora)
        if self.cfg.arch == "llama":
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = F.gelu(u, approximate="tanh")
        return self._lin(layer, "down", u, lora)

    # -- passes ---------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        seq_index: Tensor,
        tables: Tensor,
        kv: PagedKV,
        types: Tensor | None = None,
        lora_rows: Tensor | None = None,
    ) -> Tensor:
        """Run rows through every layer, writing their K/V into ``kv``; (R, hidden) out.

        tokens, positions, seq_index: (R,) long; row r is token ``tokens[r]`` at
        position ``positions[r]`` of sequence ``seq_index[r]``, whose block table is
        ``tables[seq_index[r]]`` ((S, max_blocks) int32). Rows of one sequence are
        consecutive and in position order (a prefill chunk); a decode step is one
        row per sequence. The result is the last layer's output, before the final
        norm (see :meth:`logits`). Positions below a row's own must already be in
        the cache (written by an earlier call, or by an earlier row of this one).
        ``lora_rows`` (R,): each row's adapter slot (:meth:`adapter_slot`), -1 for
        none (the model's own adapter, where it has one); None when no row has one.
        """
        x = self._embed(tokens, positions, types)  # (R, hidden)
        if self.own_adapter is not None:  # rows that name none run the model's own
            own = len(self.adapters)
            if lora_rows is None:
                lora_rows = torch.full(
                    (tokens.shape[0],), own, dtype=torch.int32, device=tokens.device
                )
            else:
                lora_rows = torch.where(lora_rows < 0, own, lora_rows).to(torch.int32)
        if lora_rows is not None and not bool((lora_rows >= 0).any()):
            lora_rows = None
        if self.native:
            x = x.float().contiguous()
            self.native.run(x, positions, seq_index, tables, kv, lora_rows, self._lora_table)
            return x
        return self._torch_forward(x, positions, seq_index, tables, kv, lora_rows)

    @torch.inference_mode()
    def logits(self, h: Tensor) -> Tensor:
        """Final norm and LM head over rows of :meth:`forward`'s output: (n, hidden) -> (n, V).

        On the C path both are per-row kernels, so a row's logits do not depend
        on the other rows.
        """
        if self.native:
            return self.head.rows(self.native.norm(h, self.norm)).float()
        return self.head(self.norm(h)).float()

    @torch.inference_mode()
    def final_norm(self, h: Tensor) -> Tensor:
        """The final norm over rows of :meth:`forward`'s output, (n, hidden) -> (n, hidden)
        fp32: the last hidden state transformers reports (embeddings)."""
        if self.native:
            return self.native.norm(h, self.norm)
        return self.norm(h).float()

    def _torch_forward(
        self,
        x: Tensor,
        positions: Tensor,
        seq_index: Tensor,
        tables: Tensor,
        kv: PagedKV,
        lora_rows: Tensor | None = None,
    ) -> Tensor:
        """The same pass with torch ops (bf16, a GPU, or no C compiler): the step's
        sequences padded to one batch, every tensor on the weights' device."""
        cfg = self.cfg
        dev = x.device
        bs = kv.block_size
        # Split rows into sequences (consecutive runs of one seq_index), pad on the right.
        seqs, counts = torch.unique_consecutive(seq_index, return_counts=True)
        b, t = len(seqs), int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        col = torch.arange(t, device=dev)
        valid = col[None, :] < counts[:, None]  # (B, T)
        rows = (starts[:, None] + col[None, :]).clamp(max=x.shape[0] - 1)  # (B, T) row index
        xb = x[rows] * valid[..., None]  # (B, T, hidden)
        pos = torch.where(valid, positions[rows], 0)  # (B, T); padding looks at position 0
        tab = tables[seqs].long()  # (B, max_blocks)
        length = int(pos.max()) + 1
        nbl = (length + bs - 1) // bs
        # Where each valid row's K/V goes: block and offset.
        vb, vt = valid.nonzero(as_tuple=True)
        wblk = tab[vb, pos[vb, vt] // bs]
        woff = pos[vb, vt] % bs
        seen = torch.arange(length, device=dev)[None, None, :] <= pos[:, :, None]  # (B, T, L)
        mask = seen.unsqueeze(1)  # (B, 1, T, L)
        freqs = None if self.rope is None else self.rope[pos]  # (B, T, D/2)
        slots = None if lora_rows is None else lora_rows[starts].long()  # (B,) per sequence
        for i, layer in enumerate(self.layers):
            lora = None if slots is None else _Lora(i, slots)
            q, k, v = self._qkv(layer, layer.norm1(xb), freqs, lora)  # (B, H|Hkv, T, D)
            kv.k[i][wblk, :, woff] = k[vb, :, vt]  # (N, Hkv, D) written in place
            kv.v[i][wblk, :, woff] = v[vb, :, vt]
            # (B, nbl, Hkv, BS, D) -> (B, Hkv, L, D): this batch's cache, gathered.
            kk = kv.k[i][tab[:, :nbl]].permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :length]
            vv = kv.v[i][tab[:, :nbl]].permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :length]
            a = F.scaled_dot_product_attention(
                q, kk, vv, attn_mask=mask, enable_gqa=cfg.group > 1
            )  # (B, H, T, D)
            xb = xb + self._lin(layer, "out", a.transpose(1, 2).reshape(b, t, -1), lora)
            xb = xb + self._mlp(layer, layer.norm2(xb), lora)
        return xb[valid]  # (R, hidden), rows in their original order

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights read per decoded token (embeddings excluded: only looked up)."""
        total = sum(
            lin.nbytes
            for layer in self.layers
            for lin in (layer.qkv, layer.out, layer.up, layer.down)
        )
        return total + self.head.nbytes

    @property
    def embed_bytes(self) -> int:
        """Bytes the token embeddings take (looked up, not read whole, per token)."""
        e = self.embed
        return e.numel() * e.element_size() if isinstance(e, Tensor) else e.nbytes
