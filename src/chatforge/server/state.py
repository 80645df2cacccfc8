"""What the routes share: the served models, the server's settings and lifecycle, and
which loaded model a request reaches.

One :class:`ServerState` per app, at ``app.state.chatforge``; routes get it with
:func:`get_state` and refuse work while the server shuts down with the
:func:`open_for_requests` dependency. :meth:`ServerState.target` turns a request's
``model`` into a loaded model (503 while it loads, 404 for a name not served).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from chatforge.errors import ChatforgeError
from chatforge.generation.config import GenerationConfig
from chatforge.generation.service import EngineService
from chatforge.models.registry import ALIASES
from chatforge.publish import ADAPTER_NAME
from chatforge.server.errors import APIError
from chatforge.server.logbook import ServerLog
from chatforge.server.pool import Base, ModelPool, Route, Target
from chatforge.server.schemas import ChatMessageIn, Limits

MODEL_NAME = ADAPTER_NAME
"""A name an adapter may be served under (:data:`chatforge.publish.ADAPTER_NAME`)."""


@dataclass
class ServedModel:
    """One model a server serves (``chatforge serve --model``).

    ``load``: a LoadedModel, or a callable returning one (run on a worker thread).
    Models with the same ``base`` key share one loaded base; ``adapter_dir``: a LoRA
    adapter applied per request on it. ``system`` and ``defaults`` (a named model's):
    the system prompt and generation settings used where a request gives none.
    ``aliases``: other names that reach it; ``own_names``: also accept the loaded
    model's own name and reference (and a bundled model's hub id).
    """

    name: str | None
    load: Any
    base: str | None = None
    adapter_dir: Path | None = None
    system: str | None = None
    defaults: GenerationConfig | None = None
    aliases: Iterable[str] = ()
    own_names: bool = True
    listed_names: Iterable[str] = ()


@dataclass
class ServerState:
    """What the routes share: the models (a :class:`ModelPool`), the per-request
    settings, and the lifecycle.

    ``model_id``, ``loaded``, ``service``, ``status`` and ``error`` are those of the
    default model (the first ``--model``), as a one-model server has them.
    """

    pool: ModelPool
    limits: Limits = field(default_factory=Limits)
    """Per-request limits (``max_tokens``, ``n``, body size)."""
    body_timeout: float = 30.0
    """Seconds a client has to send its whole request body before it gets 408."""
    retry_after: int = 1
    """The ``Retry-After`` seconds of a 503 (loading, shutting down) or 429."""
    draining: bool = False
    """Set on shutdown (SIGTERM): in-flight requests finish, new ones get 503."""
    created: int = field(default_factory=lambda: int(time.time()))
    """Unix time the server started (the models' ``created``)."""
    started: bool = False
    """Set once the start-up loads have been tried."""
    log: ServerLog = field(default_factory=ServerLog)
    """The conversation log ``POST /v1/feedback`` writes to (disabled: ``--no-log``)."""

    @property
    def model_id(self) -> str:
        """The id of the default model (what clients pass as ``model``)."""
        return self.pool.default.name

    @property
    def _base(self) -> Base:
        return self.pool.base_of(self.pool.default)

    @property
    def loaded(self) -> Any:
        """The default model's LoadedModel, once loaded."""
        return self._base.loaded

    @property
    def service(self) -> EngineService | None:
        """The default model's continuous-batching engine, once loaded."""
        return self._base.service

    @property
    def status(self) -> str:
        """The default model's: ``loading`` -> ``ready``; ``error`` if loading failed.
        A model unloaded after ``ttl`` is ``ready``: the next request loads it."""
        status = self._base.status
        if status in ("unloaded", "loading"):
            return "ready" if self.started and self._base.nbytes else "loading"
        return status

    @property
    def error(self) -> str | None:
        """Why the default model failed to load."""
        return self._base.error

    def check_open(self) -> None:
        """503 once the server is shutting down."""
        if self.draining:
            raise APIError(503, "the server is shutting down", retry_after=self.retry_after)

    async def target(self, name: str | None) -> Target:
        """The model a request names, loaded (503 while it loads at start, or if it
        failed to; one unloaded since, after ``ttl``, is loaded and waited for)."""
        self.check_open()
        route = self.pool.resolve(name)
        base = self.pool.base_of(route)
        if base.status == "error" and not self.started:
            raise APIError(503, f"the model failed to load: {base.error}")
        if base.status == "error":
            raise APIError(503, f"the model {route.name!r} failed to load: {base.error}")
        if not self.started and not base.ready:
            raise APIError(503, "the model is still loading", retry_after=self.retry_after)
        return await self.pool.target(name)

    def base_name(self, route: Route) -> str:
        """The name of the plain model on ``route``'s base (the base's reference when
        only named models run on it)."""
        for r in self.pool.routes:
            if r.base == route.base and r.adapter is None and r.own_names:
                return r.name
        return route.base


def get_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a route's dependency)."""
    return request.app.state.chatforge


def open_for_requests(request: Request) -> None:
    """A route dependency: 503 once the server is shutting down."""
    get_state(request).check_open()


def build_pool(
    specs: list[ServedModel],
    ttl: float | None,
    memory_mb: float | None,
    make_service: Callable[[Base, Any], EngineService],
) -> ModelPool:
    """Routes and bases from the served models: one base per distinct ``base`` key."""
    routes: list[Route] = []
    bases: dict[str, Base] = {}
    for i, spec in enumerate(specs):
        key = spec.base or spec.name or f"model-{i}"
        if key not in bases:
            load = spec.load if callable(spec.load) else (lambda m=spec.load: m)
            bases[key] = Base(key=key, load=load)
        route = Route(
            name=spec.name or "",
            base=key,
            adapter=None if spec.adapter_dir is None else (spec.name or key),
            adapter_dir=spec.adapter_dir,
            system=spec.system,
            defaults=spec.defaults,
            aliases=set(spec.aliases),
            listed_names=list(spec.listed_names),
            own_names=spec.own_names and spec.adapter_dir is None,
        )
        if route.name and any(route.name in r.names for r in routes):
            raise ChatforgeError(f"two models are served as {route.name!r}; name them apart")
        routes.append(route)
    return ModelPool(routes, bases, make_service, ttl=ttl, memory_mb=memory_mb)


def own_names(pool: ModelPool, base: Base, loaded: Any) -> None:
    """A plain model also answers to the loaded model's own name and reference (and a
    bundled model's hub id); one loaded from a callable without a name takes its reference."""
    own = {loaded.info.name, loaded.info.ref}
    alias = ALIASES.get(loaded.info.ref)
    if alias is not None and alias.hub_id:
        own.add(alias.hub_id)
    taken = {n for r in pool.routes for n in r.names if r.base != base.key}
    for route in pool.routes:
        if route.base == base.key and route.own_names:
            if not route.name:
                route.name = loaded.info.ref or loaded.info.name
            route.aliases |= {n for n in own if n and n not in taken and n != route.name}


def with_system(messages: list[ChatMessageIn], system: str | None) -> list[ChatMessageIn]:
    """A named model's system prompt first, unless the request brings its own."""
    if not system or any(m.role in ("system", "developer") for m in messages):
        return messages
    return [ChatMessageIn(role="system", content=system), *messages]
