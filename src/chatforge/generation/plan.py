"""From messages to an engine request: the one place history is fitted to the context.

Chat, the server, batch generation and evaluation all call
:func:`plan_request`: it renders the messages in the model's prompt format,
fits them in the context (dropping whole oldest turns when asked to, and
saying which) and resolves the reply budget into ``Request.max_new_tokens``,
so every caller gets the same answer to "how long may this reply be?" and the
same errors when nothing fits. The answer comes from
:func:`chatforge.conversation.budget.reply_budget`, the one rule that the engine
also applies when it checks a request (it is then the same number).

Messages with no text the format renders (an empty prompt) are the format's start
token (:meth:`~chatforge.conversation.PromptFormat.start`): the reply is sampled
as from a freshly pretrained model. The format's stop strings (the text format's
blank line) join the request's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatforge.conversation import BudgetConfig, Message, PromptFormat, as_message, fit_prompt
from chatforge.generation.config import GenerationConfig
from chatforge.generation.types import Request


@dataclass
class PlannedRequest:
    """A request ready for the engine, and what was given up to make it fit."""

    request: Request
    messages: list[Message]
    """What is sent (after dropping)."""
    dropped: list[Message] = field(default_factory=list)
    """Oldest messages left out to fit the context, oldest first."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)


def plan_request(
    fmt: PromptFormat,
    messages: Sequence[Message | Mapping[str, Any]],
    context_length: int,
    config: GenerationConfig,
    *,
    drop_history: bool = True,
    budget: BudgetConfig | None = None,
    **request_fields: Any,
) -> PlannedRequest:
    """Render ``messages`` for a reply and fit them in ``context_length``.

    ``drop_history``: drop whole oldest turns (never the system prompt or the
    newest message) until prompt and reply fit; otherwise a prompt that leaves
    no room raises :class:`~chatforge.errors.ContextOverflowError` as it is.
    ``request_fields`` are passed to :class:`Request` (``logprobs``,
    ``processors``, ...). Raises ContextOverflowError when even the newest
    message cannot fit.
    """
    msgs = [as_message(m) for m in messages]
    extra_stops = [s for s in fmt.stop_strings() if s not in config.stop]
    if extra_stops:
        config = config.replace(stop=(*config.stop, *extra_stops))
    if fmt.is_empty(msgs):  # nothing to render: start from the start token
        enc = fmt.start()
        max_new = config.reply_budget(len(enc.input_ids), context_length)
        kept, dropped = msgs, []
    elif drop_history:
        fitted = fit_prompt(
            fmt,
            msgs,
            context_length,
            config.max_new_tokens,
            budget,
            max_length=config.max_length,
            slide=config.slide,
        )
        enc, kept, max_new = fitted.encoded, fitted.messages, fitted.max_new_tokens
        dropped = [msgs[i] for i in fitted.dropped]
    else:
        enc = fmt.encode(msgs, add_generation_prompt=True)
        # Raises ContextOverflowError when the prompt leaves no room for a reply.
        max_new = config.reply_budget(len(enc.input_ids), context_length)  # the one rule
        kept, dropped = msgs, []
    request = Request(
        prompt_ids=list(enc.input_ids),
        config=config,
        token_type_ids=enc.token_type_ids,
        reply_token_type=enc.reply_token_type,
        max_new_tokens=max_new,
        **request_fields,
    )
    if config.slide and request.keep_tokens is None:
        request.keep_tokens = system_head(fmt, kept, request.prompt_ids)
    return PlannedRequest(request, kept, dropped)


def system_head(fmt: PromptFormat, messages: Sequence[Message], prompt_ids: list[int]) -> int:
    """How many tokens at the start of ``prompt_ids`` (``messages`` rendered) are the
    system prompt: the head a sliding reply keeps (``Request.keep_tokens``). The leading
    system messages are rendered alone; the tokens they share with the prompt are the
    head. 0 without a system message, or in a format that has no system role."""
    system = []
    for m in messages:
        if m.role != "system":
            break
        system.append(m)
    if not system:
        return 0
    try:
        alone = fmt.encode(system, add_generation_prompt=False).input_ids
    except Exception:  # noqa: BLE001 - a template that wants a user turn: no head
        return 0
    n = 0
    for a, b in zip(alone, prompt_ids, strict=False):
        if a != b:
            break
        n += 1
    return n
