"""Build a :class:`FastDecoder` from a loaded transformers model.

Supported: Llama-family models (``llama``, ``qwen2``, ``mistral`` without a
sliding window; SmolLM2 is a Llama) and ``gpt2``. Anything else returns
``None`` with the reason, and the engine keeps using transformers' modules.
"""

from __future__ import annotations

from typing import Any

import torch

from chatforge.models.fast.linear import QUANT_MODES, make_linear
from chatforge.models.fast.model import FastConfig, FastDecoder, Layer, Norm

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


def _w(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def build_fast_model(
    model: Any, dtype: torch.dtype = torch.float32, quantize: str = "none", group_size: int = 32
) -> FastDecoder:
    """Copy (and optionally quantise) a transformers model's weights into a FastDecoder."""
    if quantize not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANT_MODES)}")
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(reason)
    if model.config.model_type == "gpt2":
        dec = _from_gpt2(model, dtype, quantize, group_size)
    else:
        dec = _from_llama(model, dtype, quantize, group_size)
    # The forward path (one C call per step, or torch ops) is chosen once, here.
    from chatforge.models.fast.native_decode import NativeDecode

    dec.native = NativeDecode.build(dec)
    return dec


def _interleave(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from (0..D/2-1, D/2..D-1) to (0, D/2, 1, D/2+1, ...).

    transformers rotates feature i with feature i + D/2; adjacent pairs let the
    rotation be one complex multiply. Works on (H*D, K) weights and (H*D,) biases.
    """
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    shape = t.shape
    return t.reshape(n_heads, head_dim, -1)[:, perm].reshape(shape)


def _lin(weight, bias, dtype, quantize, group_size):
    return make_linear(_w(weight), None if bias is None else _w(bias), dtype, quantize, group_size)


def _from_llama(model: Any, dtype, quantize: str, group_size: int) -> FastDecoder:
    cfg = model.config
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
    layers = []
    for blk in inner.layers:
        at, mlp = blk.self_attn, blk.mlp
        biases = [p.bias for p in (at.q_proj, at.k_proj, at.v_proj)]
        qkv_b = None
        if any(b is not None for b in biases):
            qb, kb, vb = (_w(b) if b is not None else None for b in biases)
            qkv_b = torch.cat(
                [_interleave(qb, n_heads, head_dim), _interleave(kb, n_kv, head_dim), vb]
            )
        qkv_w = torch.cat(
            [
                _interleave(_w(at.q_proj.weight), n_heads, head_dim),
                _interleave(_w(at.k_proj.weight), n_kv, head_dim),
                _w(at.v_proj.weight),
            ]
        )
        layers.append(
            Layer(
                norm1=Norm(blk.input_layernorm.weight.detach().to(dtype), None, fc.eps, rms=True),
                qkv=_lin(qkv_w, qkv_b, dtype, quantize, group_size),
                out=_lin(at.o_proj.weight, at.o_proj.bias, dtype, quantize, group_size),
                norm2=Norm(
                    blk.post_attention_layernorm.weight.detach().to(dtype), None, fc.eps, rms=True
                ),
                up=_lin(
                    torch.cat([_w(mlp.gate_proj.weight), _w(mlp.up_proj.weight)]),
                    None,
                    dtype,
                    quantize,
                    group_size,
                ),
                down=_lin(mlp.down_proj.weight, None, dtype, quantize, group_size),
            )
        )
    # Rotary tables from the model's own inverse frequencies (covers scaled variants).
    rot = inner.rotary_emb
    inv_freq = rot.inv_freq.detach().float()  # (D/2,)
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    freqs = torch.outer(torch.arange(fc.max_positions, dtype=torch.float32), inv_freq)  # (P, D/2)
    head = model.get_output_embeddings().weight
    return FastDecoder(
        cfg=fc,
        embed=inner.embed_tokens.weight.detach().to(dtype),
        layers=layers,
        norm=Norm(inner.norm.weight.detach().to(dtype), None, fc.eps, rms=True),
        head=_lin(head, None, dtype, quantize, group_size),
        rope=torch.polar(torch.full_like(freqs, scaling), freqs),  # (P, D/2) complex64
    )


def _from_gpt2(model: Any, dtype, quantize: str, group_size: int) -> FastDecoder:
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

    layers = [
        Layer(
            norm1=ln(b.ln_1),
            qkv=conv(b.attn.c_attn),
            out=conv(b.attn.c_proj),
            norm2=ln(b.ln_2),
            up=conv(b.mlp.c_fc),
            down=conv(b.mlp.c_proj),
        )
        for b in tr.h
    ]
    return FastDecoder(
        cfg=fc,
        embed=tr.wte.weight.detach().to(dtype),
        layers=layers,
        norm=ln(tr.ln_f),
        head=_lin(model.get_output_embeddings().weight, None, dtype, quantize, group_size),
        pos_embed=tr.wpe.weight.detach().to(dtype),
    )
