"""The engine as a service: its steps run in a background thread.

The HTTP server (and anything else with many concurrent callers) submits
requests from any thread or event loop; each request's events come back on
its own queue. Requests submitted while others run join the running batch at
the next step (continuous batching); a cancelled request (a client that went
away) leaves the batch at the next step.

Observers (``EngineService(..., observers=[fn])`` or ``service.observers``) see
every request whoever submitted it, e.g. for metrics: ``fn(kind, key, event,
now)`` is called on the service thread with ``time.perf_counter()`` ``now``;
``kind`` is ``"add"`` (the engine took request ``key``), ``"event"`` (one of its
:class:`StreamEvent`; the last has ``completion``) or ``"end"`` (it ended without
a completion: cancelled, refused, or the engine stopped). An observer must be
quick; its exceptions are logged and ignored.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch

from chatforge.errors import ChatforgeError
from chatforge.generation.engine import Engine
from chatforge.generation.types import Request, StreamEvent

log = logging.getLogger(__name__)

Observer = Callable[[str, int, "StreamEvent | None", float], None]
"""``fn(kind, key, event, now)``: see the module docstring."""


class QueueFullError(ChatforgeError):
    """More requests are waiting than the service accepts; retry later."""


class Handle:
    """One submitted request: iterate its events, or cancel it."""

    def __init__(self, service: EngineService, key: int, loop: asyncio.AbstractEventLoop | None):
        self.service = service
        self.key = key
        self.loop = loop
        self.engine_id: int | None = None  # the engine's handle, once added
        self._q: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self.done = False

    def _put(self, item: StreamEvent | BaseException) -> None:
        # Called on the service thread.
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._q.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass
        else:
            self._q.put(item)

    def events(self) -> Iterator[StreamEvent]:
        """Blocking iteration (for handles submitted without an event loop)."""
        while True:
            item = self._q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.completion is not None:
                return

    async def aevents(self) -> AsyncIterator[StreamEvent]:
        """Async iteration (for handles submitted with ``loop=``)."""
        try:
            while True:
                item = await self._q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.completion is not None:
                    self.done = True
                    return
        finally:
            if not self.done:  # the consumer stopped early (client disconnected)
                self.cancel()

    def cancel(self) -> None:
        """Stop generating for this request; its place in the batch is freed next step."""
        self.done = True
        self.service.cancel(self.key)


class EngineService:
    """Runs an engine's steps on a background thread.

    ``fatal`` is set (and the thread ends) if the engine itself cannot go on;
    a failure of one request only fails that request.
    """

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 32,
        max_queue: int = 256,
        observers: list[Observer] | None = None,
    ) -> None:
        self.engine = engine
        self.observers: list[Observer] = list(observers or [])
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.fatal: str | None = None
        self._handles: dict[int, Handle] = {}
        self._inbox: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._keys = itertools.count()
        self._threads = torch.get_num_threads()  # the creating thread's setting
        self._thread = threading.Thread(target=self._run, name="chatforge-engine", daemon=True)
        self._thread.start()

    @property
    def occupancy(self) -> tuple[int, int]:
        """(running, waiting) sequence counts (waiting: submitted, not yet running)."""
        running, waiting = self.engine.occupancy
        with self._lock:
            return running, waiting + sum(1 for k, _ in self._inbox if k == "add")

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request. Raises ContextOverflowError (too long), ValueError (a field out
        of range) or QueueFullError now."""
        prepared = self.engine.prepare(request)  # validated in the caller's thread
        with self._lock:
            if self.fatal is not None:
                raise ChatforgeError(f"the engine stopped: {self.fatal}")
            if self._stop:
                raise ChatforgeError("the engine is shutting down")
            _, waiting = self.engine.occupancy
            pending = sum(1 for k, _ in self._inbox if k == "add")
            if waiting + pending >= self.max_queue:
                raise QueueFullError(
                    f"{waiting + pending} requests are waiting (limit {self.max_queue}); "
                    "retry later"
                )
            key = next(self._keys)
            handle = Handle(self, key, loop)
            self._handles[key] = handle
            self._inbox.append(("add", (key, request, prepared)))
        self._wake.set()
        return handle

    def cancel(self, key: int) -> None:
        with self._lock:
            self._inbox.append(("cancel", key))
        self._wake.set()

    def close(self, timeout: float | None = None) -> None:
        """Finish in-flight requests, then stop the thread."""
        with self._lock:
            self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, arg in inbox:
            if kind == "add":
                key, req, prepared = arg
                handle = self._handles.get(key)
                if handle is None:  # cancelled before it was added
                    continue
                try:
                    handle.engine_id = self.engine.add(
                        req, on_event=self._forward(key), prepared=prepared
                    )
                    self._notify("add", key)
                except Exception as e:  # validated at submit; report anything else
                    self._finish(key, e)
            else:
                with self._lock:
                    handle = self._handles.pop(arg, None)
                if handle is not None and handle.engine_id is not None:
                    self.engine.abort(handle.engine_id)
                    self._notify("end", arg)

    def _forward(self, key: int):
        def deliver(ev: StreamEvent) -> None:
            event = StreamEvent(key, ev.text, ev.completion, ev.tokens)
            self._notify("event", key, event)
            if ev.completion is not None:
                self._finish(key, event)
            else:
                with self._lock:
                    handle = self._handles.get(key)
                if handle is not None:
                    handle._put(event)

        return deliver

    def _finish(self, key: int, item: StreamEvent | BaseException) -> None:
        with self._lock:
            handle = self._handles.pop(key, None)
        if handle is not None:
            handle._put(item)
        if isinstance(item, BaseException):
            self._notify("end", key)

    def _notify(self, kind: str, key: int, event: StreamEvent | None = None) -> None:
        """Tell the observers (on the service thread); their faults are not the engine's."""
        if not self.observers:
            return
        now = time.perf_counter()
        for fn in self.observers:
            try:
                fn(kind, key, event, now)
            except Exception:  # noqa: BLE001
                log.exception("service observer %r failed", fn)

    def _run(self) -> None:
        # OpenMP settings are per thread: give this one the creator's thread count
        # explicitly (the server saw 4-5x slower decoding without a live creator).
        torch.set_num_threads(self._threads)
        try:
            while True:
                self._drain_inbox()
                if not self.engine.has_work:
                    with self._lock:
                        if self._stop and not self._inbox:
                            return
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                # A failing request is failed inside; events go out to the handles.
                self.engine.step(self.max_batch)
        except BaseException as e:  # noqa: BLE001 - the engine itself broke
            self.fatal = f"{type(e).__name__}: {e}"
            log.critical("the engine stopped and cannot serve more requests: %s", self.fatal)
            with self._lock:
                handles, self._handles = dict(self._handles), {}
            for key, handle in handles.items():
                handle._put(ChatforgeError(f"the engine stopped: {self.fatal}"))
                self._notify("end", key)
