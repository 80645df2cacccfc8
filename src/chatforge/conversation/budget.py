"""The context budget: how long a reply may be, and which turns fit in the context.

:func:`reply_budget` is the one rule for "how many tokens may this reply
have?": every caller (``GenerationConfig.reply_budget``, :func:`fit_prompt`,
``plan_request``, the engine's request check) asks it, so they cannot disagree.

The prompt plus the room left for the reply must fit in the limit
(``min(context_length, max_length)``). When they do not, whole oldest turns
(a user message and the replies after it) are dropped; system messages and the
newest user message never are. The caller learns which messages were dropped.

Fitting encodes the full conversation once; only when it does not fit does it
binary-search the number of dropped turns (prompt length never grows when
turns are dropped), so a long chat costs O(log turns) encodes, not O(turns^2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatforge.conversation.formats import Encoded, PromptFormat
from chatforge.conversation.messages import Message, as_message
from chatforge.errors import ContextOverflowError

DEFAULT_MAX_NEW_TOKENS = 256
"""Reply length used when neither ``max_new_tokens`` nor ``max_length`` is given."""


def reply_budget(
    prompt_tokens: int,
    context_length: int | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    cap: int | None = None,
    slide: bool = False,
) -> int:
    """The number of tokens a reply to a ``prompt_tokens``-long prompt may have.

    ``max_new_tokens`` counts the reply (None: :data:`DEFAULT_MAX_NEW_TOKENS`, unless
    ``max_length`` is given, which then alone limits the reply), ``max_length`` counts
    prompt + reply (as in Hugging Face); the reply is capped by ``max_length -
    prompt_tokens`` and by ``context_length - prompt_tokens`` and is then >= 1, or a
    :class:`ContextOverflowError` says which limit leaves no room.

    ``cap`` is a budget resolved earlier for this prompt (``Request.max_new_tokens``,
    e.g. what :func:`fit_prompt` left after dropping history): the answer is at most
    that. ``cap=0`` asks for no reply (the prompt is only scored): the answer is 0 once
    the whole prompt fits in the context, whatever the length settings.

    ``slide``: the reply may go past the context (``GenerationConfig.slide``: the engine
    drops the oldest tokens after a kept head and computes the window again), so the
    context does not cap the budget; the prompt must still leave room for one token.
    """
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int):
        raise ValueError(f"prompt_tokens must be an integer (got {prompt_tokens!r})")
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be >= 0 (got {prompt_tokens})")
    if context_length is not None and context_length < 1:
        raise ValueError(f"context_length must be >= 1 (got {context_length})")
    if cap is not None and cap < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (got {cap})")

    if cap == 0:  # score the prompt only: all of it must fit, nothing more
        if context_length is not None and prompt_tokens > context_length:
            raise ContextOverflowError(
                f"the prompt is {prompt_tokens} tokens but the model's context is "
                f"{context_length} tokens; shorten it",
                prompt_tokens=prompt_tokens,
                limit=context_length,
            )
        return 0

    budget: int | None = max_new_tokens
    if budget is None and max_length is None:
        budget = DEFAULT_MAX_NEW_TOKENS

    if max_length is not None:
        room = max_length - prompt_tokens
        if room < 1:
            raise ContextOverflowError(
                f"max_length {max_length} leaves no room for a reply: the prompt is "
                f"already {prompt_tokens} tokens; raise it or use --max-new-tokens",
                prompt_tokens=prompt_tokens,
                limit=max_length,
            )
        budget = room if budget is None else min(budget, room)

    if context_length is not None:
        room = context_length - prompt_tokens
        if room < 1:
            raise ContextOverflowError(
                f"the prompt is {prompt_tokens} tokens but the model's context is "
                f"{context_length} tokens, which leaves no room for a reply; "
                "shorten the prompt or drop history",
                prompt_tokens=prompt_tokens,
                limit=context_length,
            )
        if not slide:
            budget = room if budget is None else min(budget, room)

    assert budget is not None and budget >= 1
    return budget if cap is None else min(budget, cap)


def context_caps_reply(
    prompt_tokens: int,
    context_length: int | None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    cap: int | None = None,
    slide: bool = False,
) -> bool:
    """True when the context, not ``max_new_tokens``/``max_length``/``cap``, is what
    :func:`reply_budget` limits this reply by: a reply that uses its whole budget then
    stopped because the context was full (``Completion.context_full``; the CLI says so
    and names ``--slide``). Never with ``slide`` (the reply goes past the context).

    A ``cap`` equal to the room the context leaves is taken as the context's own
    (:func:`fit_prompt` and ``plan_request`` resolve a budget that way); a smaller
    one is the caller's limit.
    """
    if slide or cap == 0 or context_length is None:
        return False
    room = context_length - prompt_tokens
    if cap is not None and cap < room:
        return False
    wanted = reply_budget(prompt_tokens, max_new_tokens=max_new_tokens, max_length=max_length)
    return wanted > room


@dataclass
class BudgetConfig:
    """How much of the context the prompt and its history may take."""

    max_history_share: float = 1.0
    """Max share of the limit that earlier turns (everything before the newest user
    message except system messages) may take; in (0, 1]."""
    max_prompt_share: float = 1.0
    """Max share of the limit the whole prompt may take while history can still be
    dropped; in (0, 1]."""
    min_reply_tokens: int = 16
    """Room always left for a reply (or ``max_new_tokens`` when that is smaller)."""

    def __post_init__(self) -> None:
        for name in ("max_history_share", "max_prompt_share"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if self.min_reply_tokens < 1:
            raise ValueError(f"min_reply_tokens must be at least 1, got {self.min_reply_tokens}")


@dataclass
class FittedPrompt:
    """A prompt that fits, and what was given up to make it fit."""

    messages: list[Message]
    """What is sent: system messages, kept turns and the newest user message."""
    encoded: Encoded
    """``messages`` encoded with a generation prompt."""
    dropped: list[int]
    """Indices (into the input messages) of the dropped messages, oldest first."""
    max_new_tokens: int
    """The reply budget after fitting (>= 1), as :func:`reply_budget` resolves it."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded.input_ids)


def _group_turns(msgs: Sequence[Message]) -> list[list[int]]:
    """Indices of the droppable history (all but the last message), grouped into turns."""
    groups: list[list[int]] = []
    for i, m in enumerate(msgs[:-1]):
        if m.role == "system":
            continue
        if m.role == "user" or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def fit_prompt(
    fmt: PromptFormat,
    messages: Sequence[Message | Mapping[str, Any]],
    context_length: int,
    max_new_tokens: int | None,
    budget: BudgetConfig | None = None,
    max_length: int | None = None,
    slide: bool = False,
) -> FittedPrompt:
    """Drop oldest turns until the prompt and the reply fit; see the module docstring.

    ``max_length`` counts prompt + reply (as in Hugging Face); ``max_new_tokens``
    counts the reply only. Turns are dropped until ``max_new_tokens`` (None:
    ``min_reply_tokens``) fit beside the prompt; the reply budget of the prompt that
    is kept is then :func:`reply_budget`'s (lowered when less room is left, never below
    ``min(min_reply_tokens, max_new_tokens)``). Raises :class:`ContextOverflowError`
    when even the system prompt and the newest user message leave too little room.

    ``slide``: the reply may go past the context (the engine drops the oldest tokens
    as it goes), so turns are dropped only until ``min_reply_tokens`` (or a smaller
    ``max_new_tokens``) fit, and the context does not cap the reply budget.
    """
    budget = budget or BudgetConfig()
    msgs = [as_message(m) for m in messages]
    if not msgs or msgs[-1].role != "user":
        raise ValueError("the last message must be a user message (the one to reply to)")
    if context_length < 1:
        raise ValueError(f"context_length must be at least 1, got {context_length}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")

    limit = context_length if max_length is None else min(context_length, max_length)
    reserve = max_new_tokens if max_new_tokens is not None else budget.min_reply_tokens
    if slide:  # the reply slides past the context: only its start must fit beside the prompt
        reserve = min(reserve, budget.min_reply_tokens)
    groups = _group_turns(msgs)

    cache: dict[int, tuple[list[Message], list[int], Encoded]] = {}

    def attempt(k: int) -> tuple[list[Message], list[int], Encoded]:
        """The prompt with the ``k`` oldest turns dropped."""
        if k not in cache:
            gone = {i for g in groups[:k] for i in g}
            kept = [m for i, m in enumerate(msgs) if i not in gone]
            cache[k] = (kept, sorted(gone), fmt.encode(kept, add_generation_prompt=True))
        return cache[k]

    base = len(groups)  # everything droppable dropped

    def fits(k: int) -> bool:
        n = len(attempt(k)[2])
        if n + reserve > limit or n > budget.max_prompt_share * limit:
            return False
        if budget.max_history_share < 1 and k < base:
            return n - len(attempt(base)[2]) <= budget.max_history_share * limit
        return True

    if fits(0):
        k = 0
    else:
        lo, hi = min(1, base), base  # smallest k in [lo, hi] that fits; base if none does
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        k = lo

    kept, dropped, encoded = attempt(k)
    n = len(encoded)
    room = limit - n
    need = min(budget.min_reply_tokens, reserve)
    if room < need:
        raise ContextOverflowError(
            _overflow_message(fmt, msgs, n, room, need, context_length, max_length),
            prompt_tokens=n,
            limit=limit,
        )
    reply = reply_budget(
        n, context_length, max_new_tokens=max_new_tokens, max_length=max_length, slide=slide
    )
    return FittedPrompt(kept, encoded, dropped, reply)


def _overflow_message(
    fmt: PromptFormat,
    msgs: list[Message],
    prompt_tokens: int,
    room: int,
    need: int,
    context_length: int,
    max_length: int | None,
) -> str:
    if max_length is not None and max_length < context_length:
        return (
            f"max_length {max_length} leaves no room for a reply: the prompt is already "
            f"{prompt_tokens} tokens; raise it or use --max-new-tokens"
        )
    user_tokens = len(fmt.encode([msgs[-1]], add_generation_prompt=True))
    has_system = any(m.role == "system" for m in msgs)
    size = f"the message is {user_tokens} tokens"
    if has_system:
        size += f" (with the system prompt, {prompt_tokens})"
    left = (
        "leaving no room for a reply"
        if room <= 0
        else f"leaving only {room} tokens for a reply (at least {need} needed)"
    )
    fix = "shorten the message or the system prompt" if has_system else "shorten the message"
    return f"{size} but the model's context is {context_length} tokens, {left}; {fix}"
