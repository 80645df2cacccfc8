"""Attention over packed rows one example at a time, instead of through a (B, 1, T, T) mask.

A packed row holds several examples back to back. Through transformers' sdpa
path it needs the block-diagonal mask from :func:`~chatforge.training.examples.collate`,
and with a mask torch's CPU flash kernel computes every (query block, key block)
pair of the row: the blocked ones across examples and the whole upper triangle.
Here each example's slice of the row gets its own causal sdpa call
(``is_causal=True``: the kernel skips the blocks above the diagonal), so a row of
examples of lengths L_i costs about sum(L_i^2) / 2 score entries instead of T^2.
For SmolLM2 at context 1024 attention was 30 % of a LoRA step.

It is a transformers attention function (``AttentionInterface``) named
:data:`NAME`; the trainer switches a model to it with :func:`use_packed_attention`
(after checking that it gives the mask path's logits) and passes each batch's
example lengths as the ``packed_spans`` keyword of the model call, which
transformers hands through the layers to the attention function. Without
``packed_spans`` (a caller that built a mask) it is plain sdpa, except with dropout
on the attention weights (GPT-2's ``attn_pdrop``), which torch's CPU flash kernel
does not take: sdpa then falls back to its math path and torch's Bernoulli
sampler (9 ms for a (8, 4, 128, 128) mask on 2 AVX2 cores); here the same math
runs with :func:`chatforge.training.dropout.dropout` (0.6 ms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from chatforge.training.dropout import dropout as fast_dropout

NAME = "chatforge_packed"

Spans = tuple[tuple[int, ...], ...]  # per row, the lengths of its examples in order


def packed_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_spans: Spans | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Causal attention within each example of each row; returns (B, T, H, D) like sdpa.

    query (B, H, T, D), key/value (B, Hkv, T, D). Positions after a row's last
    example (padding) get zeros: nothing reads them (their targets are ignored).
    """
    if packed_spans is None:
        if dropout > 0.0 and module.training:
            return _dropout_attention(query, key, value, attention_mask, dropout, scaling), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    B, H, T, D = query.shape

    def causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # (b, H, L, D) -> (b, L, H, D)
        out, _ = sdpa_attention_forward(
            module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True
        )
        return out

    first = packed_spans[0]
    if len(first) == 1 and all(s == first for s in packed_spans):  # one example per row, same
        n = first[0]  # length everywhere: one batched call
        out = causal(query[:, :, :n], key[:, :, :n], value[:, :, :n])
        return _pad_time(out, T), None
    rows = []
    for b, lengths in enumerate(packed_spans):
        parts, off = [], 0
        for n in lengths:
            sl = slice(off, off + n)
            q, k, v = (x[b : b + 1, :, sl] for x in (query, key, value))
            parts.append(causal(q, k, v))
            off += n
        rows.append(_pad_time(torch.cat(parts, dim=1), T))
    return torch.cat(rows, dim=0), None


def _dropout_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, p: float, scaling: float | None
) -> Tensor:
    """softmax(q k^T * scaling + mask) with dropout, times v: sdpa's math path; (B, T, H, D).

    query (B, H, T, D), key/value (B, Hkv, S, D); mask (B | 1, 1, T, S) additive or
    bool (True = attend), or None for causal."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    T, S = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)  # (B, H, T, S)
    low = torch.finfo(scores.dtype).min
    if mask is None:  # causal, the queries being the last T of the S positions
        blocked = torch.ones(T, S, dtype=torch.bool, device=scores.device).triu_(S - T + 1)
        scores = scores.masked_fill(blocked, low)
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., :S], low)
    else:
        scores = scores + mask[..., :S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(fast_dropout(probs, p), value)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous()


def _pad_time(out: Tensor, T: int) -> Tensor:
    """(b, n, H, D) -> (b, T, H, D), zeros after position n."""
    n = out.shape[1]
    if n == T:
        return out
    return torch.cat([out, out.new_zeros(out.shape[0], T - n, *out.shape[2:])], dim=1)


AttentionInterface.register(NAME, packed_attention)


def use_packed_attention(model: Any, check: Callable[[], bool]) -> str | None:
    """Switch ``model`` to :data:`NAME` when ``check()`` confirms it; returns the name to restore.

    Only models on transformers' sdpa or eager attention are switched (others
    bring their own kernels or masks). ``check`` runs a packed forward both ways
    and returns True when the logits agree; on False or an exception the model
    is left as it was and None is returned.
    """
    from chatforge.training.model import unwrap

    config = unwrap(model).config
    before = getattr(config, "_attn_implementation", None)
    if before not in ("sdpa", "eager"):
        return None
    config._attn_implementation = NAME
    try:
        ok = bool(check())
    except Exception:  # a model that does not pass keyword arguments down to attention
        ok = False
    if not ok:
        config._attn_implementation = before
        return None
    return before


def restore_attention(model: Any, before: str | None) -> None:
    """Undo :func:`use_packed_attention` (the saved config names the model's own attention)."""
    if before is not None:
        from chatforge.training.model import unwrap

        unwrap(model).config._attn_implementation = before


@torch.no_grad()
def spans_match_mask(model: Any, vocab_size: int, uses_types: bool = False) -> bool:
    """True when rows run with ``packed_spans`` give the logits the block-diagonal mask gives.

    Two batches: rows of several examples with padding after the shorter row
    (the per-example path), and rows of one example each (the batched path).
    """
    from chatforge.training.examples import IGNORE, Row, collate, model_inputs, to_device

    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(0)
        dev = next(model.parameters()).device

        def row(lengths: list[int]) -> Row:
            n = sum(lengths)
            ids = torch.randint(0, vocab_size, (n,), generator=g).tolist()
            return Row(ids, [0] * n if uses_types else None, [IGNORE] * n, lengths)

        for rows in ([row([5, 4]), row([3, 2, 2])], [row([6]), row([6])]):
            a, b = (to_device(collate(rows, 0, spans=s), dev) for s in (False, True))
            mask, spans = (model(**model_inputs(x)).logits.float() for x in (a, b))
            for r, n in enumerate(sum(x.lengths) for x in rows):  # padding positions differ
                if not torch.allclose(mask[r, :n], spans[r, :n], atol=1e-4, rtol=1e-3):
                    return False
        return True
    finally:
        model.train(was_training)
