"""``GET /health``: 200 when the default model can answer (with the batch's occupancy),
503 while it loads, after it failed, or while the server drains; no API key needed."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from chatforge.server.state import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """The server's status, for load balancers and ``chatforge serve``'s own wait."""
    state = get_state(request)
    pool = state.pool
    services = [b.service for b in pool.bases.values() if b.service is not None]
    fatal = next((s.fatal for s in services if s.fatal is not None), None)
    if fatal is not None:  # an engine thread died: say so, and why
        return JSONResponse({"status": "error", "error": fatal}, status_code=503)
    models = {r.name: pool.base_of(r).status for r in pool.routes}
    if state.status == "ready" and not state.draining:
        running = sum(s.occupancy[0] for s in services)
        waiting = sum(s.occupancy[1] for s in services)
        body = {"status": "ok", "model": state.model_id, "running": running}
        body["waiting"] = waiting
        if len(models) > 1:
            body["models"] = models
        return JSONResponse(body)
    status = "draining" if state.draining else state.status
    headers = {"Retry-After": str(state.retry_after)} if status == "loading" else None
    return JSONResponse({"status": status, "error": state.error}, status_code=503, headers=headers)
