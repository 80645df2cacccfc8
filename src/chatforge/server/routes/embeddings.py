"""``POST /v1/embeddings``: OpenAI's embeddings route, computed by the engine.

An embedding is the mean of the input's tokens' final hidden states (after the
final norm: transformers' ``last_hidden_state``), L2-normalised. Each input is
one :class:`~chatforge.generation.types.Request` with ``embed=True`` submitted
to the server's :class:`~chatforge.generation.service.EngineService`, so it is
batched with whatever else runs, on the same copy of the model.

"""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from chatforge.errors import ContextOverflowError
from chatforge.generation.service import EngineService
from chatforge.generation.types import Completion
from chatforge.generation.types import Request as EngineRequest
from chatforge.server.errors import APIError
from chatforge.server.schemas import parse
from chatforge.server.state import get_state, open_for_requests
from chatforge.server.transport import collect, context_error, read_json, submit

MAX_INPUTS = 2048
"""Most inputs per request (OpenAI's limit)."""


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings`` (strict types; unknown fields ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # refused: we do not truncate (never silently ignored)
    user: str | None = None  # accepted and ignored, as OpenAI's abuse-tracking id


router = APIRouter(dependencies=[Depends(open_for_requests)])


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> JSONResponse:
    """OpenAI's embeddings: one vector per input, batched with whatever else runs."""
    state = get_state(request)
    body = await read_json(request, state.limits, state.body_timeout)
    req: EmbeddingRequest = parse(EmbeddingRequest, body)
    t = await state.target(req.model)
    loaded, service = t.loaded, t.service
    if req.dimensions is not None:
        raise APIError(
            400,
            "dimensions is not supported: this server returns the model's full "
            f"hidden size (got dimensions={req.dimensions})",
            param="dimensions",
        )
    inputs = _inputs(req.input)

    def encode() -> list[list[int]]:
        return [list(loaded.tokenizer.encode(x)) if isinstance(x, str) else x for x in inputs]

    try:  # tokenising long inputs takes a while: not on the loop
        ids = await asyncio.to_thread(encode)
    except (ValueError, TypeError, OverflowError) as e:
        raise APIError(400, f"cannot tokenise the input: {e}", param="input") from None
    if not all(ids):
        raise APIError(400, "input must not contain an empty string", param="input")
    reqs = [
        EngineRequest(prompt_ids=x, max_new_tokens=0, embed=True, adapter=t.route.adapter)
        for x in ids
    ]
    try:  # all inputs are checked (vocabulary, context) before any is queued
        for r in reqs:
            service.engine.budget_for(r)
    except ContextOverflowError as e:
        raise context_error(e, "input") from None
    except ValueError as e:
        raise APIError(400, str(e), param="input") from None
    done = await _run(service, reqs, request, state.retry_after)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(c, req.encoding_format)}
        for i, c in enumerate(done)
    ]
    tokens = sum(len(x) for x in ids)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": t.route.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The request's inputs, one string or token list each; 400 naming ``input`` when
    there are none, too many, or an empty one."""
    if isinstance(value, str):
        items: list = [value]
    elif value and isinstance(value[0], int):
        items = [list(value)]  # one input given as token ids
    else:
        items = list(value)
    if not items:
        raise APIError(400, "input must not be empty", param="input")
    if len(items) > MAX_INPUTS:
        raise APIError(
            400, f"input may hold at most {MAX_INPUTS} items (got {len(items)})", param="input"
        )
    if any(len(x) == 0 for x in items):
        raise APIError(400, "input must not contain an empty string or list", param="input")
    return items


async def _run(
    service: EngineService, reqs: list[EngineRequest], request: Request, retry_after: int
) -> list[Completion]:
    """Completions of ``reqs`` in order, submitted ``service.max_batch`` at a time (a batch
    of many inputs would otherwise overflow the service's queue); cancels on disconnect."""
    done: list[Completion] = []
    window = max(1, service.max_batch)
    for lo in range(0, len(reqs), window):
        handles = submit(service, reqs[lo : lo + window], "input", retry_after)
        done += await collect(handles, request)
    return done


def _encode(c: Completion, encoding_format: str) -> list[float] | str:
    """The vector as JSON floats, or (``base64``) its little-endian float32 bytes in
    base64, as OpenAI sends it."""
    vec = c.embedding
    if vec is None:  # the engine fills it for every finished embedding request
        raise APIError(500, "the engine returned no embedding")
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
    return vec
