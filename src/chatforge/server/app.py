"""The OpenAI-compatible HTTP API: :func:`create_app` assembles it.

The app's parts, one concern each: :mod:`~chatforge.server.state` (the served models,
settings and lifecycle every route reads from ``app.state.chatforge``),
:mod:`~chatforge.server.routes` (one router per concern: chat, completions,
embeddings, tokenizer, models and adapters, health, the page, feedback),
:mod:`~chatforge.server.transport` (request bodies, submitting, waiting, SSE),
:mod:`~chatforge.server.responses` (OpenAI's answer shapes), and the middleware of
:mod:`~chatforge.server.guard` and :mod:`~chatforge.server.metrics`.

The models load in background tasks at startup, so ``/health`` answers 503 while
loading and 200 once ready. Every request is rendered to prompt tokens by its route
and submitted to its model's :class:`~chatforge.generation.service.EngineService`:
requests arriving while others decode join the running batch at the next step, and a
client that goes away (mid-stream or while waiting) is cancelled, freeing its place.

Run it with ``chatforge serve`` or any ASGI server::

    app = create_app(lambda: load_model("smollm2"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from chatforge.errors import ChatforgeError
from chatforge.generation.engine import Engine, EngineConfig
from chatforge.generation.service import EngineService
from chatforge.server import errors
from chatforge.server.guard import BearerAuth, HostGuard
from chatforge.server.logbook import ServerLog
from chatforge.server.metrics import register_metrics
from chatforge.server.pool import Base
from chatforge.server.routes import ROUTERS
from chatforge.server.schemas import Limits
from chatforge.server.state import ServedModel, ServerState, build_pool, own_names
from chatforge.server.watch import AdapterWatcher

__all__ = ["ServedModel", "ServerState", "create_app"]


def create_app(
    loaded_or_loader: Any = None,
    *,
    models: Iterable[ServedModel] = (),
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 32,
    threads: int | None = None,
    limits: Limits | None = None,
    model_id: str | None = None,
    retry_after: int = 1,
    on_load_error: Callable[[BaseException], None] | None = None,
    drain_timeout: float = 60.0,
    allowed_hosts: Iterable[str] = (),
    cors_origins: Iterable[str] | None = None,
    body_timeout: float = 30.0,
    served_model_names: Iterable[str] = (),
    ttl: float | None = None,
    max_memory_mb: float | None = None,
    log: bool | str | Path = True,
    watch: Iterable[tuple[str, Path]] = (),
    watch_interval: float = 2.0,
) -> FastAPI:
    """An app serving ``loaded_or_loader`` (a LoadedModel, or a callable returning one),
    or several ``models`` (:class:`ServedModel`; the first is the default).

    ``api_key``: when set, every route but ``/health`` (and the static page) needs
    ``Authorization: Bearer <key>``. ``max_queue``: requests waiting for a batch
    place beyond which new ones get 429. ``max_batch``: sequences decoded together.
    ``threads``: CPU threads for the forward pass (None: the cores other processes
    leave free, see :class:`~chatforge.threads.ThreadPolicy`).
    ``limits``: per-request limits (``max_tokens``, ``n``, body size).
    ``on_load_error`` is called when a model fails to load at start.
    ``allowed_hosts``: ``Host`` names served besides localhost, 127.0.0.1, [::1] and
    the address a connection came in on (``"*"``: any); others get 403, which stops
    DNS rebinding (see :mod:`chatforge.server.guard`). ``cors_origins``: browser
    origins allowed to call the API cross-origin (none by default). ``body_timeout``:
    seconds a client has to send its whole request body before it gets 408.
    ``ttl``: seconds a model may sit idle before it is unloaded (the next request
    for it loads it again); ``max_memory_mb``: the budget for loaded models' weights
    (idle ones are unloaded, least recently used first, to stay within it).
    ``log``: where ``POST /v1/feedback`` keeps judgements: True, the conversation log
    in the data dir; a path, that file; False (``--no-log``), nowhere (it answers 501).
    ``watch``: ``(name, directory)`` pairs (``serve --watch``): each finished LoRA
    training output in a directory is served as ``name``, looked for every
    ``watch_interval`` seconds (see :mod:`chatforge.server.watch`).
    """
    specs = _specs(loaded_or_loader, models, model_id, served_model_names)

    def make_service(base: Base, loaded: Any) -> EngineService:
        # The server's own engine (its --max-batch and --threads), and the model's shared
        # one from now on: whatever else uses this model shares its prefix cache.
        engine = Engine.from_loaded(loaded, EngineConfig(max_batch=max_batch, threads=threads))
        loaded.engine = engine
        own_names(pool, base, loaded)
        return EngineService(
            engine, max_batch=max_batch, max_queue=max_queue, observers=[metrics.observe]
        )

    pool = build_pool(specs, ttl, max_memory_mb, make_service)
    state = ServerState(
        pool=pool,
        limits=limits or Limits(),
        body_timeout=body_timeout,
        retry_after=retry_after,
        log=ServerLog(None if isinstance(log, bool) else log, enabled=log is not False),
    )
    watcher = AdapterWatcher(state, watch, watch_interval) if watch else None
    app = FastAPI(
        title="chatforge",
        lifespan=_lifespan(state, ttl, drain_timeout, on_load_error, watcher),
        docs_url=None,
        redoc_url=None,
    )
    app.state.chatforge = state
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    # Added innermost first: host check -> CORS (preflights carry no key) -> key check.
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    origins = list(cors_origins or [])
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HostGuard, allowed_hosts=list(allowed_hosts))
    # Outermost: counts every answer, those of the middleware above included.
    metrics = register_metrics(app, state)
    return app


def _specs(
    loaded_or_loader: Any,
    models: Iterable[ServedModel],
    model_id: str | None,
    served_model_names: Iterable[str],
) -> list[ServedModel]:
    """The served models: ``models``, after the one model given the one-model way."""
    specs = list(models)
    if loaded_or_loader is not None:
        served = list(served_model_names)
        name = served[0] if served else model_id
        if name is None and not callable(loaded_or_loader):
            name = loaded_or_loader.info.ref or loaded_or_loader.info.name
        aliases = [*served[1:], *([model_id] if served and model_id else [])]
        specs.insert(
            0, ServedModel(name, loaded_or_loader, aliases=aliases, listed_names=served[1:])
        )
    return specs


def _lifespan(
    state: ServerState,
    ttl: float | None,
    drain_timeout: float,
    on_load_error: Callable[[BaseException], None] | None,
    watcher: AdapterWatcher | None = None,
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Load the models at start (in the background), unload idle ones after ``ttl``,
    run the ``watcher`` if any, and on shutdown drain: new requests get 503, in-flight
    ones finish."""
    pool = state.pool

    async def start() -> None:
        await pool.start()
        state.started = True
        failed = [b for b in pool.bases.values() if b.status == "error"]
        if failed and on_load_error is not None:
            on_load_error(ChatforgeError(f"could not load {failed[0].key}: {failed[0].error}"))

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(max(0.05, min(5.0, (ttl or 5.0) / 4)))
            await pool.sweep()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(start())]
        if ttl is not None:
            tasks.append(asyncio.create_task(sweeper()))
        if watcher is not None:
            tasks.append(asyncio.create_task(watcher.run()))
        yield
        state.draining = True
        for task in tasks:
            if not task.done():
                task.cancel()
        await pool.close(drain_timeout)  # in-flight requests have been answered by now
        state.log.close()

    return lifespan
