"""Getting a request in and its answer out: the JSON body (size, time, encoding limits),
submitting engine requests to a model's service, waiting for them while watching the
client, and server-sent events.

Every route that runs the engine (chat, completions, embeddings) goes through these,
so a client that goes away is cancelled, and a full queue, an overlong prompt or a
shutdown are answered the same way everywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from chatforge.errors import ChatforgeError, ContextOverflowError, ParamError
from chatforge.generation.service import EngineService, Handle, QueueFullError
from chatforge.generation.types import Completion
from chatforge.generation.types import Request as EngineRequest
from chatforge.server.errors import APIError
from chatforge.server.guard import check_json_content_type
from chatforge.server.schemas import Limits, param_error

log = logging.getLogger("chatforge.server")

DISCONNECT_POLL_S = 0.25
"""How often a waiting route checks that its client is still there."""


async def read_json(request: Request, limits: Limits, timeout: float) -> Any:
    """The body as JSON: 415 when it is not sent as JSON, 413 when it is over the limit,
    408 when it takes longer than ``timeout`` seconds to arrive, 400 when it is not JSON."""
    check_json_content_type(request.headers.get("content-type"))
    too_big = APIError(
        413, f"the request body is larger than {limits.max_body_bytes} bytes", code="body_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise too_big
    except TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {timeout:g} s", code="body_timeout"
        ) from None
    except ClientDisconnect:
        client = request.client
        log.info(
            "client %s went away mid-body (%s)",
            f"{client.host}:{client.port}" if client else "?",
            request.url.path,
        )
        raise APIError(499, "the client closed the request") from None
    try:
        return json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8", code="invalid_json") from None
    except ValueError as e:
        raise APIError(
            400, f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None


def context_error(e: ContextOverflowError, param: str) -> APIError:
    """OpenAI's wording (clients such as litellm match it to raise their own
    context-window error), then ours, which says what to do."""
    where = "messages" if param == "messages" else "prompt"
    return APIError(
        400,
        f"This model's maximum context length is {e.limit} tokens. However, you requested "
        f"{e.prompt_tokens + 1} tokens ({e.prompt_tokens} in the {where}, at least 1 in the "
        f"completion). Please reduce the length of the {where}. ({e})",
        param=param,
        code="context_length_exceeded",
    )


def cancel(handles: list[Handle]) -> None:
    """Cancel every handle (freeing its batch place)."""
    for h in handles:
        h.cancel()


def submit(
    service: EngineService,
    requests: list[EngineRequest],
    param: str,
    retry_after: int,
) -> list[Handle]:
    """Submit ``requests`` in order; all or none are queued (the ones submitted are
    cancelled when one is refused). ``param`` names the request field errors point at."""
    loop = asyncio.get_running_loop()
    handles: list[Handle] = []
    try:
        for req in requests:
            handles.append(service.submit(req, loop=loop))
    except ContextOverflowError as e:
        cancel(handles)
        raise context_error(e, param) from None
    except QueueFullError as e:
        cancel(handles)
        raise APIError(429, f"the server is at capacity: {e}", retry_after=retry_after) from None
    except ParamError as e:  # "logit_bias names token ...": its own field, not the prompt
        cancel(handles)
        raise param_error(e) from None
    except ValueError as e:  # the prompt cannot be generated from
        cancel(handles)
        raise APIError(400, str(e), param=param) from None
    except ChatforgeError as e:  # shutting down
        cancel(handles)
        raise APIError(503, str(e), retry_after=retry_after) from None
    return handles


async def collect(handles: list[Handle], request: Request) -> list[Completion]:
    """Wait for every handle's completion; cancel them all if the client disconnects."""

    async def one(h: Handle) -> Completion:
        async for ev in h.aevents():
            if ev.completion is not None:
                if ev.completion.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.completion.error}")
                return ev.completion
        raise RuntimeError("the engine ended a request without a completion")

    # One task per choice rather than gather(): the first failure ends them all, and
    # every task is awaited, so no exception is left unretrieved.
    tasks = [asyncio.ensure_future(one(h)) for h in handles]
    try:
        while True:
            done, pending = await asyncio.wait(
                tasks, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION
            )
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                raise APIError(499, "the client closed the request")
    finally:
        cancel([h for h, t in zip(handles, tasks, strict=True) if not t.done()])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merged(handles: list[Handle]) -> AsyncIterator[tuple[int, Any]]:
    """Events of all handles as ``(choice index, event)``, as they come."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        try:
            async for ev in h.aevents():
                await q.put((i, ev))
        except Exception as e:  # noqa: BLE001 - forwarded to the consumer
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, ev = await q.get()
            if isinstance(ev, Exception):
                raise ev
            if ev.completion is not None and ev.completion.finish_reason == "error":
                raise RuntimeError(ev.completion.error)
            yield i, ev
            if ev.completion is not None:
                left -= 1
    finally:  # also when the client went away: cancelling a pump cancels its request
        for t in tasks:
            t.cancel()


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events of ``chunks``, then ``[DONE]``; an error after the headers
    went out is reported in the stream."""

    async def frames() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-stream
            log.exception("generation failed mid-stream")
            err = APIError(500, f"generation failed: {type(e).__name__}: {e}")
            yield f"data: {json.dumps(err.body())}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
