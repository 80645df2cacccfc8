"""Build a :class:`FastDecoder` from a loaded transformers model.

Supported: Llama-family models (``llama``, ``qwen2``, ``mistral`` without a
sliding window; SmolLM2 is a Llama) and ``gpt2``. Anything else returns
``None`` with the reason, and the engine keeps using transformers' modules.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chatforge.models.fast.gguf_weights import BlockEmbedding, GGUFWeights
from chatforge.models.fast.layout import interleave
from chatforge.models.fast.linear import QUANT_MODES, DenseLinear, QuantLinear, make_linear
from chatforge.models.fast.model import FastConfig, FastDecoder, Layer, Norm
from chatforge.models.fast.native_decode import NativeDecode

LLAMA_TYPES = ("llama", "qwen2", "mistral")
STATIC_ROPE = ("default", "linear", "llama3")


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot run this model (None: it can)."""
    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    if mt == "gpt2":
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(
            cfg, "reorder_and_upcast_attn", False
        ):
            return "GPT-2 attention variants are not supported"
        if getattr(cfg, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            return f"activation {cfg.activation_function} is not supported"
        return None
    if mt not in LLAMA_TYPES:
        return f"architecture {mt!r} has no fast path"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act} is not supported"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases are not supported"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mt != "qwen2"):
        return "sliding-window attention is not supported"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    )
    if rope_type not in STATIC_ROPE:
        return f"RoPE type {rope_type!r} is not supported"
    return None


class _Source:
    """The transformers model being converted, part by part.

    With ``release``, :meth:`done` frees a part's weights as soon as it is
    converted, after making sure the fast decoder holds its own copy of any
    tensor it shares with them (a same-dtype norm, a dense weight). transformers
    reads safetensors weights as views of one memory-mapped file, which stays
    mapped (and its touched pages resident) until its last weight is gone, so
    dropping a tensor is not enough: its pages are given back explicitly. The
    conversion's temporaries, freed, can stay in malloc's heap between long-lived
    allocations (measured: +350 MB in one run out of three on SmolLM2); that free
    space is given back too.
    """

    def __init__(self, release: bool) -> None:
        self.release = release
        self._maps = _weight_file_maps() if release else []

    def owned(self, t: Tensor, module: Any) -> Tensor:
        """``t`` (converted from ``module``), copied where it shares ``module``'s storage."""
        if self.release and _storage(t) in _storages(module):
            return t.clone()
        return t

    def done(self, module: Any, *kept: Any) -> None:
        """``module`` is converted into ``kept`` (layers, norms, linears): free its weights."""
        if not self.release:
            return
        shared = _storages(module)
        for obj in kept:
            _own(obj, shared)
        for m in module.modules():
            for p in m._parameters.values():
                if p is not None:
                    _drop_pages(p, self._maps)
                    p.data = torch.empty(0, dtype=p.dtype)
            for name, buf in m._buffers.items():
                if buf is not None:
                    _drop_pages(buf, self._maps)
                    m._buffers[name] = torch.empty(0, dtype=buf.dtype)
        _trim_heap()


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.numel() else 0


def _storages(module: Any) -> set[int]:
    ts = [*module.parameters(), *module.buffers()]
    return {_storage(t) for t in ts if t.numel()}


def _own(obj: Any, shared: set[int]) -> None:
    """Replace tensors of ``obj`` (a decoder, layer, norm or linear, recursively) that live in
    ``shared`` storage by copies."""
    for name, v in list(vars(obj).items()):
        if isinstance(v, Tensor):
            if v.numel() and _storage(v) in shared:
                setattr(obj, name, v.clone())
        elif isinstance(v, FastDecoder | Layer | Norm | DenseLinear | QuantLinear):
            _own(v, shared)
        elif isinstance(v, list):
            for x in v:
                _own(x, shared)


_MADV_DONTNEED = 4  # Linux


def _weight_file_maps() -> list[tuple[int, int]]:
    """Address ranges where safetensors files are memory-mapped in this process (Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(".safetensors"):
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def _drop_pages(t: Tensor, maps: list[tuple[int, int]]) -> None:
    """Give back the whole pages of ``t`` that lie in a mapped weight file.

    The mapping is private and these pages unmodified (or no longer needed), so
    the kernel drops them; nothing reads them again. Pages shared with a
    neighbouring tensor are kept.
    """
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if end == start or not any(lo <= start and end <= hi for lo, hi in maps):
        return
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = end // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _trim_heap() -> None:
    """Return malloc's free heap pages to the system (glibc; elsewhere nothing)."""
    trim = getattr(_libc(), "malloc_trim", None) if sys.platform.startswith("linux") else None
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    return libc


def _w(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def build_fast_model(
    model: Any,
    dtype: torch.dtype = torch.float32,
    quantize: str = "none",
    group_size: int = 32,
    release: bool = False,
    gguf: GGUFWeights | None = None,
) -> FastDecoder:
    """Copy (and optionally quantise) a transformers model's weights into a FastDecoder.

    With ``release``, each part of ``model`` (embeddings, each layer, ...) is
    freed as soon as it is converted, so memory peaks near one model instead of
    two; ``model`` is unusable afterwards (also when the build fails part way).

    ``quantize="gguf"`` (with ``gguf``, the file ``model`` was converted from): the
    file's Q4_0/Q4_1/Q8_0 weights go into our kernels as they are (embeddings too,
    looked up from their blocks); its other tensors are quantised as ``int8``.
    """
    if quantize not in (*QUANT_MODES, "gguf"):
        raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANT_MODES)}")
    if quantize == "gguf" and (gguf is None or model.config.model_type == "gpt2"):
        raise ValueError("quantize='gguf' needs the Llama-family GGUF file the model came from")
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(reason)
    src = _Source(release)
    if model.config.model_type == "gpt2":
        dec = _from_gpt2(model, dtype, quantize, group_size, src)
    else:
        dec = _from_llama(model, dtype, quantize, group_size, src, gguf)
    src.done(model, dec)  # whatever was not freed part by part
    # The forward path (one C call per step, or torch ops) is chosen once, here.
    dec.native = NativeDecode.build(dec)
    return dec


def _lin(weight, bias, dtype, quantize, group_size):
    return make_linear(_w(weight), None if bias is None else _w(bias), dtype, quantize, group_size)


def _from_llama(
    model: Any, dtype, quantize: str, group_size: int, src: _Source, gguf: GGUFWeights | None
) -> FastDecoder:
    cfg = model.config
    blocks = gguf if quantize == "gguf" else None
    if blocks is not None:
        quantize = "int8"  # for whatever the file does not hold as Q4 blocks
    inner = model.model
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    fc = FastConfig(
        arch="llama",
        n_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        eps=cfg.rms_norm_eps,
        dtype=dtype,
        quantize=quantize,
    )
    # Embeddings and LM head first: they are the largest tensors, and converting them
    # while no layer has been touched yet keeps the peak low (see _Source).
    embed, head = _embed_and_head(
        model, inner.embed_tokens, dtype, quantize, group_size, src, blocks
    )
    # The file's Q/K rows as they are, or reordered into ours where llama.cpp keeps
    # transformers' order (GGUFWeights.qk_order); where the order is unknown no Q/K
    # blocks are taken (None: the projection is quantised from transformers' weights).
    qkv_names: list[str] | None = ["attn_q.weight", "attn_k.weight", "attn_v.weight"]
    qkv_rows: list[Any] | None = None
    if blocks is not None and blocks.qk_order == "halves":
        qkv_rows = [
            lambda t: interleave(t, n_heads, head_dim),
            lambda t: interleave(t, n_kv, head_dim),
            None,
        ]
    elif blocks is not None and blocks.qk_order is None:
        qkv_names = None
    layers = []
    for i, blk in enumerate(inner.layers):
        at, mlp = blk.self_attn, blk.mlp
        biases = [p.bias for p in (at.q_proj, at.k_proj, at.v_proj)]
        qkv_b = None
        if any(b is not None for b in biases):
            qb, kb, vb = (_w(b) if b is not None else None for b in biases)
            qkv_b = torch.cat(
                [interleave(qb, n_heads, head_dim), interleave(kb, n_kv, head_dim), vb]
            )
        qkv_w = torch.cat(
            [
                interleave(_w(at.q_proj.weight), n_heads, head_dim),
                interleave(_w(at.k_proj.weight), n_kv, head_dim),
                _w(at.v_proj.weight),
            ]
        )

        def lin(
            names: list[str] | None, weight: Any, bias: Any, i: int = i, rows: Any = None
        ) -> Any:
            """The file's blocks of ``blk.{i}.<names>`` stacked (``rows``: see
            GGUFWeights.linear), else ``weight`` quantised."""
            own = None
            if blocks is not None and names is not None:
                b = None if bias is None else _w(bias)
                own = blocks.linear([f"blk.{i}.{n}" for n in names], b, rows)
            return own if own is not None else _lin(weight, bias, dtype, quantize, group_size)

        layer = Layer(
            norm1=Norm(blk.input_layernorm.weight.detach().to(dtype), None, fc.eps, rms=True),
            qkv=lin(qkv_names, qkv_w, qkv_b, rows=qkv_rows),
            out=lin(["attn_output.weight"], at.o_proj.weight, at.o_proj.bias),
            norm2=Norm(
                blk.post_attention_layernorm.weight.detach().to(dtype), None, fc.eps, rms=True
            ),
            up=lin(
                ["ffn_gate.weight", "ffn_up.weight"],
                torch.cat([_w(mlp.gate_proj.weight), _w(mlp.up_proj.weight)]),
                None,
            ),
            down=lin(["ffn_down.weight"], mlp.down_proj.weight, None),
        )
        src.done(blk, layer)
        layers.append(layer)
    # Rotary tables from the model's own inverse frequencies (covers scaled variants).
    rot = inner.rotary_emb
    inv_freq = rot.inv_freq.detach().float()  # (D/2,)
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    freqs = torch.outer(torch.arange(fc.max_positions, dtype=torch.float32), inv_freq)  # (P, D/2)
    return FastDecoder(
        cfg=fc,
        embed=embed,
        layers=layers,
        norm=Norm(inner.norm.weight.detach().to(dtype), None, fc.eps, rms=True),
        head=head,
        rope=torch.polar(torch.full_like(freqs, scaling), freqs),  # (P, D/2) complex64
    )


def _embed_and_head(
    model: Any,
    embedding: Any,
    dtype,
    quantize: str,
    group_size: int,
    src: _Source,
    blocks: GGUFWeights | None = None,
) -> tuple[Tensor | BlockEmbedding, Any]:
    """The token embeddings (``dtype``, or a GGUF file's blocks) and the LM head (a
    linear), in that order.

    A tied head (one tensor for both) is quantised from our copy of the
    embeddings when that copy has the model's values (same dtype), so the
    model's tensor is freed before the quantisation's temporaries exist.
    """
    if blocks is not None:
        own = blocks.embedding("token_embd.weight")
        # No output.weight in the file: the head is tied to the embeddings.
        head_name = "output.weight" if blocks.kind("output.weight") else "token_embd.weight"
        head = blocks.linear([head_name])
        if own is not None and head is not None:
            src.done(embedding)
            src.done(model.get_output_embeddings(), head)
            return own, head
    weight = embedding.weight
    head_w = model.get_output_embeddings().weight
    tied = head_w.data_ptr() == weight.data_ptr() and head_w.shape == weight.shape
    embed = src.owned(weight.detach().to(dtype), embedding)
    if not tied or embed.dtype == head_w.dtype:
        if tied:
            head_w = embed
        src.done(embedding)
    head = _lin(head_w, None, dtype, quantize, group_size)
    src.done(model.get_output_embeddings(), head)
    src.done(embedding)  # a tied head quantised from the model's own values: only now
    return embed, head


def _from_gpt2(model: Any, dtype, quantize: str, group_size: int, src: _Source) -> FastDecoder:
    cfg = model.config
    tr = model.transformer
    head_dim = cfg.n_embd // cfg.n_head
    fc = FastConfig(
        arch="gpt2",
        n_layers=cfg.n_layer,
        hidden=cfg.n_embd,
        n_heads=cfg.n_head,
        n_kv_heads=cfg.n_head,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.n_positions,
        eps=cfg.layer_norm_epsilon,
        dtype=dtype,
        quantize=quantize,
    )

    def ln(m) -> Norm:
        return Norm(m.weight.detach().to(dtype), m.bias.detach().to(dtype), fc.eps, rms=False)

    def conv(m):  # transformers' Conv1D stores (in, out): transpose to (out, in)
        return _lin(m.weight.t(), m.bias, dtype, quantize, group_size)

    embed, head = _embed_and_head(model, tr.wte, dtype, quantize, group_size, src)
    pos_embed = src.owned(tr.wpe.weight.detach().to(dtype), tr.wpe)
    src.done(tr.wpe)
    layers = []
    for b in tr.h:
        layer = Layer(
            norm1=ln(b.ln_1),
            qkv=conv(b.attn.c_attn),
            out=conv(b.attn.c_proj),
            norm2=ln(b.ln_2),
            up=conv(b.mlp.c_fc),
            down=conv(b.mlp.c_proj),
        )
        src.done(b, layer)
        layers.append(layer)
    return FastDecoder(
        cfg=fc,
        embed=embed,
        layers=layers,
        norm=ln(tr.ln_f),
        head=head,
        pos_embed=pos_embed,
    )
