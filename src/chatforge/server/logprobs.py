"""Logprobs in the shapes OpenAI's APIs return them.

* ``/v1/completions`` (the legacy shape lm-evaluation-harness reads): parallel lists
  ``tokens``, ``token_logprobs`` (``None`` for a first prompt token, which has no
  context), ``top_logprobs`` (``{token: logprob}`` dicts) and ``text_offset``
  (character offsets into the returned text).
* ``/v1/chat/completions``: ``content`` entries ``{token, logprob, bytes, top_logprobs}``.

Token strings are each token decoded alone; ``bytes`` are that string's UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatforge.generation.types import TokenLogprob


def _text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def legacy_logprobs(
    tokenizer: Any, entries: Sequence[tuple[int, TokenLogprob | None]], offset: int = 0
) -> dict[str, list]:
    """``(token id, its logprob or None)`` pairs -> the completions ``logprobs`` object."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, lp in entries:
        text = _text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(lp.logprob)
        alternatives: dict[str, float] = {}
        for alt_id, alt_lp in lp.top:
            alternatives.setdefault(_text(tokenizer, alt_id), alt_lp)  # best first wins a tie
        top.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], top: int) -> list[dict]:
    """Generated tokens' logprobs -> the chat ``logprobs.content`` list."""
    out = []
    for lp in entries:
        text = _text(tokenizer, lp.token_id)
        out.append(
            {
                "token": text,
                "logprob": lp.logprob,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (alt := _text(tokenizer, alt_id)),
                        "logprob": alt_lp,
                        "bytes": list(alt.encode("utf-8")),
                    }
                    for alt_id, alt_lp in lp.top[:top]
                ],
            }
        )
    return out
