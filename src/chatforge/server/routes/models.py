"""``/v1/models`` (OpenAI's list, with vLLM's ``parent``/``root`` for LoRA adapters) and
``/v1/adapters`` (load, list and unload LoRA adapters served per request on a base)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from chatforge.server.pool import Route
from chatforge.server.schemas import AdapterRequest, parse
from chatforge.server.state import ServerState, get_state, open_for_requests
from chatforge.server.transport import read_json

router = APIRouter(dependencies=[Depends(open_for_requests)])


def model_card(state: ServerState, route: Route, name: str | None = None) -> dict:
    """One model as ``/v1/models`` lists it (``name``: the name it is listed under)."""
    base = state.pool.base_of(route)
    card: dict[str, Any] = {
        "id": name or route.name,
        "object": "model",
        "created": state.created,
        "owned_by": "chatforge",
        "loaded": base.ready,
    }
    if base.ready:
        card["context_length"] = base.loaded.info.context_length
    if route.adapter is not None:  # vLLM's fields for a LoRA module
        card["parent"] = card["root"] = state.base_name(route)
    return card


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """Every served model, named model and adapter (503 while the default one loads)."""
    state = get_state(request)
    pool = state.pool
    if not state.started and not pool.base_of(pool.default).ready:
        await state.target(None)  # 503 while the default model loads at start
    cards = [
        model_card(state, route, name)
        for route in pool.routes
        for name in [route.name, *route.listed_names]
    ]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str) -> dict:
    """One model's card (404 for a name not served)."""
    state = get_state(request)
    return model_card(state, state.pool.resolve(name), name)


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> dict:
    """The LoRA adapters served, each applied per request on its base model."""
    state = get_state(request)
    data = [
        {"name": r.name, "base": state.base_name(r), "path": str(r.adapter_dir)}
        for r in state.pool.routes
        if r.adapter is not None
    ]
    return {"object": "list", "data": data}


@router.post("/v1/adapters")
async def add_adapter(request: Request) -> JSONResponse:
    """Load a LoRA adapter directory and serve it as model ``name`` on ``base``."""
    state = get_state(request)
    body = await read_json(request, state.limits, state.body_timeout)
    req: AdapterRequest = parse(AdapterRequest, body)
    # the name and the files are checked there (the same path as `serve --watch`)
    route = await state.pool.add_adapter(req.name, Path(req.path), req.base)
    return JSONResponse(
        {"name": route.name, "base": state.base_name(route), "path": str(route.adapter_dir)}
    )


@router.delete("/v1/adapters/{name:path}")
async def remove_adapter(request: Request, name: str) -> dict:
    """Stop serving adapter ``name`` and unload it (refused while requests use it)."""
    await get_state(request).pool.remove_adapter(name)
    return {"name": name, "deleted": True}
