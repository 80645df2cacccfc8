"""vLLM's tokenizer routes: ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``, so a
client can count and build prompts exactly as the server does."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from chatforge.server.errors import APIError
from chatforge.server.schemas import DetokenizeRequest, TokenizeRequest, parse
from chatforge.server.state import get_state, open_for_requests, with_system
from chatforge.server.tools import encode_with_template, plan_tools, render_messages
from chatforge.server.transport import read_json

router = APIRouter(dependencies=[Depends(open_for_requests)])


@router.post("/tokenize")
async def tokenize(request: Request) -> dict:
    """vLLM's tokenizer route: ``prompt`` or ``messages`` -> ``tokens``, ``count``."""
    state = get_state(request)
    req: TokenizeRequest = parse(
        TokenizeRequest, await read_json(request, state.limits, state.body_timeout)
    )
    t = await state.target(req.model)
    loaded = t.loaded
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")

    def encode() -> list[int]:
        if req.messages is not None:
            messages = with_system(req.messages, t.route.system)
            tools = plan_tools(req.tools, None, None)
            ids = encode_with_template(loaded.format, messages, tools, req.add_generation_prompt)
            if ids is not None:
                return ids
            msgs = render_messages(messages, tools)
            enc = loaded.format.encode(msgs, add_generation_prompt=req.add_generation_prompt)
            return list(enc.input_ids)
        return list(loaded.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))

    try:
        ids = await asyncio.to_thread(encode)
    except (ValueError, TypeError) as e:
        param = "messages" if req.messages is not None else "prompt"
        raise APIError(400, f"cannot tokenise: {e}", param=param) from None
    return {"tokens": ids, "count": len(ids), "max_model_len": loaded.info.context_length}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict:
    """vLLM's detokenizer route: ``tokens`` -> ``prompt``."""
    state = get_state(request)
    body = await read_json(request, state.limits, state.body_timeout)
    req: DetokenizeRequest = parse(DetokenizeRequest, body)
    t = await state.target(req.model)
    vocab = t.service.engine.vocab_size
    bad = next((tok for tok in req.tokens if not 0 <= tok < vocab), None)
    if bad is not None:
        raise APIError(
            400, f"token {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens"
        )
    return {"prompt": t.loaded.tokenizer.decode(req.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None) -> dict:
    """What a client needs to tokenise as the server does (``?model=`` picks one)."""
    t = await get_state(request).target(model)
    tok = t.loaded.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "vocab_size": t.service.engine.vocab_size,
        "max_model_len": t.loaded.info.context_length,
        "prompt_format": t.loaded.info.prompt_format,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "chat_template": getattr(tok, "chat_template", None),
    }
