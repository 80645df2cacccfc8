"""Several models and LoRA adapters behind one server.

Clients pick what answers with the request's ``model``. Each name is a
:class:`Route`: a base model, optionally a LoRA adapter applied per request on
it (not merged: one base in memory serves its own name and every adapter on it,
and a batch mixes them), and for a named model (``chatforge models create``) a
system prompt and generation settings used where the request gives none.

Each base model is a :class:`Base`: loaded at start, unloaded after ``ttl``
seconds without requests, loaded again by the next request that names it (which
waits for the load), and unloaded least-recently-used first when loading
another would go over ``memory_mb``. A base answering requests is never unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.generation.service import EngineService
from chatforge.models.adapter_files import CONFIG_FILE, AdapterError, check_adapter_files
from chatforge.publish import ADAPTER_NAME
from chatforge.server.errors import APIError

log = logging.getLogger("chatforge.server")

LOAD_WAIT_S = 600.0  # how long a request waits for its model to load
BUSY_GRACE_S = 2.0  # a base picked this recently is in use even before its request is queued


@dataclass
class Route:
    """A name clients pass as ``model``, and what answers it."""

    name: str
    base: str  # key of the Base in the pool
    adapter: str | None = None  # a LoRA adapter applied per request on the base
    adapter_dir: Path | None = None  # where it is read from (again after an unload)
    system: str | None = None  # used when a chat request has no system message
    defaults: Any = None  # a GenerationConfig: settings a request leaves out
    aliases: set[str] = field(default_factory=set)  # other names that reach it
    listed_names: list[str] = field(default_factory=list)  # aliases /v1/models shows too
    own_names: bool = False  # also answers to the loaded model's own names

    @property
    def names(self) -> set[str]:
        """Every name that reaches this route."""
        return {self.name, *self.aliases}


@dataclass
class Base:
    """One base model: its loader and, while loaded, its engine service."""

    key: str
    load: Callable[[], Any]  # -> LoadedModel; slow, run on a worker thread
    loaded: Any = None
    service: EngineService | None = None
    status: str = "unloaded"  # unloaded | loading | ready | error
    error: str | None = None
    last_used: float = field(default_factory=time.monotonic)  # for ttl and LRU
    picked_at: float = 0.0  # when a request last picked it (see busy)
    nbytes: int = 0  # weights in memory, known once loaded
    task: asyncio.Task | None = None  # the load in progress

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.service is not None

    def busy(self, now: float) -> bool:
        """Requests running or waiting, or one that just picked it (not yet submitted)."""
        if self.service is not None and any(self.service.occupancy):
            return True
        return now - self.picked_at < BUSY_GRACE_S


@dataclass
class Target:
    """What a request runs on: its route, and the base's model and service."""

    route: Route
    base: Base

    @property
    def loaded(self) -> Any:
        return self.base.loaded

    @property
    def service(self) -> EngineService:
        assert self.base.service is not None
        return self.base.service


def model_bytes(loaded: Any) -> int:
    """Bytes a loaded model's weights take (the fast path's, else transformers')."""
    fast = getattr(loaded, "fast", None)
    if fast is not None:
        return int(fast.weight_bytes + fast.embed_bytes)
    model = loaded.model
    return sum(p.numel() * p.element_size() for p in model.parameters())


class ModelPool:
    """The server's routes and base models; see the module docstring.

    ``make_service(base, loaded)`` builds a base's EngineService (on the event loop's
    thread). ``ttl``: seconds a base may sit idle before it is unloaded (None:
    never). ``memory_mb``: the weights' budget over all loaded bases (None: none).
    """

    def __init__(
        self,
        routes: list[Route],
        bases: dict[str, Base],
        make_service: Callable[[Base, Any], EngineService],
        ttl: float | None = None,
        memory_mb: float | None = None,
    ) -> None:
        if not routes:
            raise ValueError("a server needs at least one model")
        self.routes: list[Route] = list(routes)
        self.bases = bases
        self.make_service = make_service
        self.ttl = ttl
        self.memory_mb = memory_mb
        self._lock = asyncio.Lock()  # loads and unloads, one at a time

    # -- names --------------------------------------------------------------------

    @property
    def default(self) -> Route:
        """The first route: the one routes without a ``model`` field use."""
        return self.routes[0]

    def find(self, name: str) -> Route | None:
        """The route a request's ``model`` names, or None."""
        for route in self.routes:
            if name in route.names:
                return route
        return None

    def resolve(self, name: str | None) -> Route:
        """The route for ``name`` (None: the default); 404 naming what is served."""
        if name is None:
            return self.default
        route = self.find(name)
        if route is None:
            served = ", ".join(repr(r.name) for r in self.routes)
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {served}",
                param="model",
                code="model_not_found",
            )
        return route

    def base_of(self, route: Route) -> Base:
        return self.bases[route.base]

    # -- loading ------------------------------------------------------------------

    async def target(self, name: str | None) -> Target:
        """The loaded base for ``name``; loads it when needed (the request waits)."""
        route = self.resolve(name)
        base = self.base_of(route)
        if not base.ready:
            await self.ensure(base)
        base.last_used = base.picked_at = time.monotonic()
        return Target(route, base)

    async def ensure(self, base: Base) -> None:
        """Load ``base`` (once, whoever asks); raise 503 with the reason if it fails."""
        if base.ready:
            return
        if base.task is None or base.task.done():
            base.task = asyncio.create_task(self._load(base))
        try:
            await asyncio.wait_for(asyncio.shield(base.task), LOAD_WAIT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"the model {base.key!r} is still loading", retry_after=5) from None
        if not base.ready:
            raise APIError(503, f"the model {base.key!r} failed to load: {base.error}")

    async def _load(self, base: Base) -> None:
        async with self._lock:
            if base.ready:
                return
            base.status, base.error = "loading", None
            # A base loaded before has a known size: make room first. (The first load of
            # one is measured once loaded, and room made then.)
            await self._make_room(base, base.nbytes)
            service = None
            try:
                loaded = await asyncio.to_thread(base.load)
                # The engine thread is started from the event loop's (long-lived) thread:
                # started from a thread that then exits, it decodes 4-5x slower on CPU.
                service = self.make_service(base, loaded)
                # Adapters on this base (routes, and those added over HTTP) come back too.
                for route in self.routes:
                    if route.base == base.key and route.adapter and route.adapter_dir:
                        await asyncio.to_thread(
                            service.engine.add_adapter, route.adapter_dir, route.adapter
                        )
                base.service, base.loaded = service, loaded
                base.nbytes = model_bytes(loaded)
                base.status = "ready"
                base.last_used = time.monotonic()
                log.info("model %s ready (%.0f MB)", base.key, base.nbytes / 2**20)
                await self._make_room(base, 0)
            except Exception as e:  # reported to the requests waiting, and on /health
                if service is not None:
                    await asyncio.to_thread(service.close, 1.0)
                base.status, base.error = "error", f"{type(e).__name__}: {e}"
                log.error("could not load %s: %s", base.key, e)

    async def _make_room(self, keep: Base, incoming: int) -> None:
        """Unload idle bases other than ``keep`` (least recently used first) while the
        loaded ones and ``incoming`` more bytes exceed the memory budget."""
        if self.memory_mb is None:
            return
        budget = self.memory_mb * 2**20
        now = time.monotonic()
        idle = sorted(
            (b for b in self.bases.values() if b.ready and not b.busy(now) and b is not keep),
            key=lambda b: b.last_used,
        )
        while idle and self.used_bytes() + incoming > budget:
            victim = idle.pop(0)
            log.info("unloading %s to stay within --max-memory", victim.key)
            await self._unload(victim)

    def used_bytes(self) -> int:
        return sum(b.nbytes for b in self.bases.values() if b.ready)

    async def _unload(self, base: Base) -> None:
        service, base.service, base.loaded = base.service, None, None
        base.status = "unloaded"
        if service is not None:
            await asyncio.to_thread(service.close, 5.0)
        gc.collect()

    async def sweep(self) -> None:
        """Unload bases idle for longer than ``ttl`` (the server calls this periodically)."""
        if self.ttl is None:
            return
        now = time.monotonic()
        async with self._lock:
            for base in self.bases.values():
                if base.service is not None and any(base.service.occupancy):
                    base.last_used = now  # idle time counts from its last request's end
                elif base.ready and not base.busy(now) and now - base.last_used > self.ttl:
                    log.info("unloading %s (idle for %.0f s)", base.key, now - base.last_used)
                    await self._unload(base)

    async def start(self) -> None:
        """Load every base at start (in order), within the memory budget."""
        for base in self.bases.values():
            if self.memory_mb is not None and self.used_bytes() >= self.memory_mb * 2**20:
                break  # the rest load when first asked for
            with contextlib.suppress(APIError):
                await self.ensure(base)

    async def close(self, timeout: float) -> None:
        for base in self.bases.values():
            if base.task is not None and not base.task.done():
                base.task.cancel()
            if base.service is not None:
                await asyncio.to_thread(base.service.close, timeout)

    # -- adapters -----------------------------------------------------------------

    async def add_adapter(self, name: str, directory: Path, base_name: str | None) -> Route:
        """Serve LoRA adapter ``directory`` as model ``name`` on the base ``base_name``
        names (default: the default route's base); loads the base when needed. An
        adapter already named ``name`` is replaced. ``POST /v1/adapters`` and
        ``serve --watch`` both come here; a bad name or directory is a 400."""
        if not ADAPTER_NAME.match(name):
            raise APIError(400, f"{name!r} is not a valid name", param="name")
        directory = Path(directory).expanduser()
        if not (directory / CONFIG_FILE).is_file():
            raise APIError(
                400,
                f"{directory} is not a LoRA adapter directory (no {CONFIG_FILE})",
                param="path",
            )
        try:  # its files first (milliseconds), before an unloaded base is loaded for it
            check_adapter_files(directory, need_base=False)
        except AdapterError as e:
            raise APIError(400, str(e), param="path") from None
        directory = directory.resolve()
        existing = self.find(name)
        if existing is not None and existing.adapter is None:
            raise APIError(409, f"{name!r} already names a model", param="name")
        on = self.resolve(base_name)
        if on.adapter is not None:
            raise APIError(400, f"{base_name!r} is itself an adapter; name a base", param="base")
        target = await self.target(on.name)
        route = Route(name=name, base=on.base, adapter=name, adapter_dir=directory)
        try:
            await asyncio.to_thread(target.service.engine.add_adapter, directory, name)
        except Exception as e:  # noqa: BLE001 - AdapterError and friends: the caller's fault
            raise APIError(400, str(e), param="path") from None
        if existing is not None:
            self.routes.remove(existing)
        self.routes.append(route)
        return route

    async def remove_adapter(self, name: str) -> None:
        route = self.find(name)
        if route is None or route.adapter is None:
            raise APIError(404, f"no adapter named {name!r}", param="name", code="not_found")
        base = self.base_of(route)
        if base.ready:
            try:
                base.service.engine.remove_adapter(route.adapter)
            except Exception as e:  # noqa: BLE001 - in use
                raise APIError(409, str(e), param="name") from None
        self.routes.remove(route)
