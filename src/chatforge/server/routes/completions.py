"""``POST /v1/completions``: OpenAI's legacy completions over raw prompts (text or
token ids), with ``echo`` and prompt logprobs for scoring (lm-evaluation-harness).

An empty prompt (``""`` or ``[]`` in a list) starts from the model's start token (BOS,
``<sep>`` or EOS, as its prompt format says): unconditional generation."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from chatforge.generation.types import Request as EngineRequest
from chatforge.server.errors import APIError
from chatforge.server.responses import COMPLETION, Render, respond
from chatforge.server.schemas import CompletionRequest, generation_config, logprob_settings, parse
from chatforge.server.state import get_state, open_for_requests
from chatforge.server.transport import read_json

router = APIRouter(dependencies=[Depends(open_for_requests)])


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """Completions of one or more prompts, ``n`` choices each, streamed or not."""
    state = get_state(request)
    limits = state.limits
    body = await read_json(request, limits, state.body_timeout)
    req: CompletionRequest = parse(CompletionRequest, body)
    t = await state.target(req.model)
    loaded = t.loaded
    config = generation_config(req, limits, t.route.defaults)
    k = logprob_settings(req)
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts: list = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    if len(prompts) * req.n > limits.max_n:
        raise APIError(
            400,
            f"len(prompt) x n must be <= {limits.max_n} (got {len(prompts) * req.n})",
            param="prompt",
        )
    if req.stream and req.echo and k is not None:
        raise APIError(400, "echo with logprobs is not supported when streaming", param="echo")
    score_only = req.echo and req.max_tokens == 0

    def encode() -> tuple[list[list[int]], list[str]]:
        ids = [list(loaded.tokenizer.encode(p)) if isinstance(p, str) else list(p) for p in prompts]
        texts = [p if isinstance(p, str) else loaded.tokenizer.decode(p) for p in prompts]
        return ids, texts

    try:  # tokenising a long prompt takes a while: not on the loop
        encoded, texts = await asyncio.to_thread(encode)
    except (ValueError, TypeError, OverflowError) as e:
        raise APIError(400, f"cannot tokenise the prompt: {e}", param="prompt") from None
    start = loaded.format.start()  # the prompt of an empty prompt
    types = [None if ids else start.token_type_ids for ids in encoded]
    reply_types = [None if ids else start.reply_token_type for ids in encoded]
    encoded = [ids or list(start.input_ids) for ids in encoded]
    bases = [
        EngineRequest(
            prompt_ids=ids,
            token_type_ids=types[i],
            reply_token_type=reply_types[i],
            config=config,
            logprobs=k,
            prompt_logprobs=k if req.echo and k is not None else None,
            max_new_tokens=0 if score_only else None,
            adapter=t.route.adapter,
        )
        for i, ids in enumerate(encoded)
    ]
    render = Render(loaded.tokenizer, k, texts if req.echo else None, encoded)
    return await respond(request, req, t, bases, "prompt", COMPLETION, render, state.retry_after)
