"""Checking a request before an engine queues it, and resolving its reply budget.

:func:`check_request` refuses, with a message a user can act on, everything that
would otherwise fail inside a step: token ids outside the vocabulary, logprob
counts out of range, an adapter that is not loaded, a ``logit_bias`` naming an
unknown token, a prompt that leaves no room for a reply (``ContextOverflowError``)
and a request larger than the KV cache's budget. The reply budget comes from
:func:`chatforge.conversation.budget.reply_budget`, the one rule for it.
"""

from __future__ import annotations

from collections.abc import Collection

from chatforge.generation.processors import check_logit_bias
from chatforge.generation.types import MAX_TOP_LOGPROBS, Request


def check_request(
    req: Request,
    *,
    vocab_size: int,
    context_length: int,
    adapters: Collection[str] = (),
    kv_tokens: int | None = None,
    kv_cache_mb: int | None = None,
) -> int:
    """The reply budget of ``req`` (0: score the prompt only), once it is valid.

    ``adapters``: the LoRA adapters loaded; ``kv_tokens``: the most tokens the KV
    cache's budget (``kv_cache_mb``) holds (None: not paged, no such limit). Raises
    ContextOverflowError when the prompt leaves no room, ValueError for anything else.
    """
    n = len(req.prompt_ids)
    if n < 1:
        raise ValueError("a prompt must have at least one token")
    bad = next((t for t in req.prompt_ids if not 0 <= int(t) < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"prompt token id {bad} is outside this model's vocabulary (0..{vocab_size - 1})"
        )
    if req.token_type_ids is not None and len(req.token_type_ids) != n:
        raise ValueError("token_type_ids must have one entry per prompt token")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(req, name)
        if k is not None and not (isinstance(k, int) and 0 <= k <= MAX_TOP_LOGPROBS):
            raise ValueError(f"{name} must be an integer in 0..{MAX_TOP_LOGPROBS} (got {k!r})")
    if req.adapter is not None and req.adapter not in adapters:
        have = ", ".join(adapters) or "none"
        raise ValueError(f"the LoRA adapter {req.adapter!r} is not loaded (loaded: {have})")
    if req.config.logit_bias:
        check_logit_bias(req.config.logit_bias, vocab_size)
    if req.embed and (req.max_new_tokens != 0 or req.prompt_logprobs is not None):
        # An embedding request's features are hidden states, not logits (HFRunner).
        raise ValueError("an embedding request needs max_new_tokens=0 and no prompt_logprobs")
    budget = req.config.reply_budget(n, context_length, cap=req.max_new_tokens)
    need = min(n + budget, context_length)  # a sliding window never outgrows the context
    if kv_tokens is not None and need > kv_tokens:
        raise ValueError(
            f"this request needs {need} tokens of KV cache but the engine's "
            f"budget (kv_cache_mb={kv_cache_mb}) holds {kv_tokens}; raise kv_cache_mb"
        )
    return budget
