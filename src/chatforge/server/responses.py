"""How chat and completion answers look: whole JSON bodies and streamed chunks, in
OpenAI's shapes, with logprobs, echo and tool calls; and :func:`respond`, which submits
a route's engine requests and answers with one or the other.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from chatforge.generation.service import Handle
from chatforge.generation.types import Completion
from chatforge.generation.types import Request as EngineRequest
from chatforge.server.logprobs import chat_logprobs, legacy_logprobs
from chatforge.server.pool import Target
from chatforge.server.schemas import ChatCompletionRequest, CompletionRequest
from chatforge.server.tools import CallStream, split_reply
from chatforge.server.transport import collect, merged, sse, submit


def finish_reason(c: Completion, calls: bool = False) -> str:
    # Our "interrupted" only happens to a client that went away; OpenAI has no such value.
    if c.finish_reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def slid(c: Completion) -> dict[str, int]:
    """chatforge's extra field on a choice whose reply slid past the context (the
    ``slide`` request extra): ``slid_tokens``, the oldest tokens dropped from its window
    (the last chunk of a stream carries it). Absent otherwise."""
    return {"slid_tokens": c.slid_tokens} if c.slides else {}


def chat_choice(c: Completion, meta: Meta, i: int) -> dict:
    # With tools, as streamed: calls (a call cut short dropped) or text, never call markup.
    content, calls = split_reply(c.text) if meta.render.tools else (c.text, None)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {
        "message": message,
        "logprobs": meta.render.chat(c.logprobs or []),
        "finish_reason": finish_reason(c, bool(calls)),
        **slid(c),
    }


@dataclass
class Render:
    """What the answer shapes need beyond the completions: logprobs and echo."""

    tokenizer: Any
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    echo: list[str] | None = None  # per prompt, its text (completions with echo)
    prompt_ids: list[list[int]] | None = None  # per prompt (echoed tokens)
    tools: bool = False  # replies may be tool calls (chat with tools)

    def legacy(self, c: Completion, prompt: int, tokens: list | None = None) -> dict | None:
        """Completions ``logprobs`` of a whole choice (or of ``tokens``, a stream chunk's)."""
        if self.logprobs is None:
            return None
        if tokens is not None:
            return legacy_logprobs(self.tokenizer, [(t.token_id, t) for t in tokens])
        entries: list = []
        if self.echo is not None and self.prompt_ids is not None:
            ids = self.prompt_ids[prompt]
            scored = c.prompt_logprobs or [None] * len(ids)
            entries += list(zip(ids, scored, strict=True))
        entries += [(t.token_id, t) for t in c.logprobs or []]
        return legacy_logprobs(self.tokenizer, entries)

    def chat(self, tokens: list) -> dict | None:
        """Chat ``logprobs`` of generated tokens."""
        if self.logprobs is None:
            return None
        return {"content": chat_logprobs(self.tokenizer, tokens, self.logprobs), "refusal": None}


@dataclass
class Meta:
    """Identity and usage accounting of one API response."""

    prefix: str
    model: str | None
    prompt_lengths: list[int]  # per prompt (each prompt has n choices)
    n: int
    render: Render
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, done: list[Completion]) -> dict[str, Any]:
        # As OpenAI counts it: each prompt once, every choice's completion tokens;
        # cached tokens are those of the first choice of each prompt.
        prompt = sum(self.prompt_lengths)
        completion = sum(c.completion_tokens for c in done)
        cached = sum(c.cached_tokens for c in done[:: self.n])
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


def chunk_body(
    meta: Meta, kind: str, choices: list[dict], include_usage: bool, usage: Any = None
) -> dict:
    """One streamed chunk, its ``object`` being ``kind`` (``usage`` is null but in the
    last one, when the client asked for usage)."""
    out = {
        "id": meta.id,
        "object": kind,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    }
    if include_usage:
        out["usage"] = usage
    return out


async def chat_chunks(handles: list[Handle], meta: Meta, include_usage: bool) -> AsyncIterator:
    def chunk(choices: list[dict], usage: Any = None) -> dict:
        return chunk_body(meta, "chat.completion.chunk", choices, include_usage, usage)

    for i in range(len(handles)):  # the first chunk of each choice carries the role
        yield chunk(
            [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
    done: dict[int, Completion] = {}
    want = meta.render.logprobs is not None
    # With tools, text that may be the start of a call is held back, and each call goes
    # out whole as a tool_calls delta once its closing tag has arrived.
    splits = {i: CallStream() for i in range(len(handles))} if meta.render.tools else {}
    calls_sent: dict[int, int] = {}
    async for i, ev in merged(handles):
        text, calls = splits[i].push(ev.text) if i in splits else (ev.text, [])
        if ev.completion is not None and i in splits:
            text += splits[i].finish()
        if text or (want and ev.tokens):
            piece: dict = {"index": i, "delta": {"content": text}, "finish_reason": None}
            if want:
                piece["logprobs"] = meta.render.chat(ev.tokens)
            yield chunk([piece])
        for call in calls:
            n = calls_sent.get(i, 0)
            calls_sent[i] = n + 1
            delta = {"tool_calls": [{"index": n, **call}]}
            yield chunk([{"index": i, "delta": delta, "finish_reason": None}])
        if ev.completion is not None:
            done[i] = ev.completion
            reason = finish_reason(ev.completion, calls_sent.get(i, 0) > 0)
            last = {"index": i, "delta": {}, "finish_reason": reason, **slid(ev.completion)}
            yield chunk([last])
    if include_usage:
        yield chunk([], meta.usage([done[i] for i in sorted(done)]))


async def completion_chunks(
    handles: list[Handle], meta: Meta, include_usage: bool
) -> AsyncIterator:
    def chunk(choices: list[dict], usage: Any = None) -> dict:
        return chunk_body(meta, "text_completion", choices, include_usage, usage)

    done: dict[int, Completion] = {}
    render = meta.render
    if render.echo is not None:  # each choice starts with its prompt
        for i in range(len(handles)):
            text = render.echo[i // meta.n]
            yield chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
    async for i, ev in merged(handles):
        if ev.text or (render.logprobs is not None and ev.tokens):
            lp = render.legacy(None, i // meta.n, ev.tokens)  # type: ignore[arg-type]
            yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": None}])
        if ev.completion is not None:
            done[i] = ev.completion
            reason = finish_reason(ev.completion)
            last = {"index": i, "text": "", "logprobs": None, "finish_reason": reason}
            yield chunk([{**last, **slid(ev.completion)}])
    if include_usage:
        yield chunk([], meta.usage([done[i] for i in sorted(done)]))


@dataclass(frozen=True)
class Shape:
    """How one endpoint names and shapes its answers."""

    prefix: str
    """Of the response id (``chatcmpl-...``)."""
    object: str
    """The ``object`` of a non-streamed response."""
    choice: Callable[[Completion, Meta, int], dict]
    """A finished choice of a non-streamed response, less its ``index``."""
    chunks: Callable[[list[Handle], Meta, bool], AsyncIterator[dict]]
    """The streamed chunks: ``(handles, meta, include_usage)``."""


CHAT = Shape(
    prefix="chatcmpl",
    object="chat.completion",
    choice=chat_choice,
    chunks=chat_chunks,
)
COMPLETION = Shape(
    prefix="cmpl",
    object="text_completion",
    choice=lambda c, meta, i: {
        "text": (meta.render.echo[i // meta.n] if meta.render.echo is not None else "") + c.text,
        "logprobs": meta.render.legacy(c, i // meta.n),
        "finish_reason": finish_reason(c),
        **slid(c),
    },
    chunks=completion_chunks,
)


async def respond(
    request: Request,
    req: ChatCompletionRequest | CompletionRequest,
    t: Target,
    bases: list[EngineRequest],
    param: str,
    shape: Shape,
    render: Render,
    retry_after: int,
) -> Response:
    """Submit ``req.n`` choices per prompt in ``bases`` (sample ``i`` seeded as
    :meth:`~chatforge.generation.config.GenerationConfig.for_sample` says); answer with
    an SSE stream of ``shape``'s chunks, or (not streaming) once all are done, with one
    JSON body. ``param`` names the request field that errors on submission point at."""
    choices = [
        EngineRequest(**{**vars(base), "config": base.config.for_sample(i)})
        for base in bases
        for i in range(req.n)
    ]
    handles = submit(t.service, choices, param, retry_after)
    meta = Meta(shape.prefix, t.route.name, [len(b.prompt_ids) for b in bases], req.n, render)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        return sse(shape.chunks(handles, meta, include_usage))
    done = await collect(handles, request)
    return JSONResponse(
        {
            "id": meta.id,
            "object": shape.object,
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": i, **shape.choice(c, meta, i)} for i, c in enumerate(done)],
            "usage": meta.usage(done),
        }
    )
