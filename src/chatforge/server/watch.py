"""``chatforge serve --watch [NAME=]DIR``: serve each finished training output in DIR.

A background task of the app (started and stopped by its lifespan) looks at every
watched directory each ``interval`` seconds. When DIR holds a finished LoRA output
(``chatforge.json``, written last by training, marked complete) that is new or
changed, and has stayed unchanged for one more look (so a copy still in progress is
not read), it is served as NAME through the pool's ``add_adapter`` (the path
``POST /v1/adapters`` takes), the previous version kept as ``NAME:vK``: the same
sequence as ``train --serve-to`` (:func:`chatforge.publish.publish_with`).

A DIR that does not exist yet, or holds an unfinished run, is waited for. A full
(non-LoRA) model there is logged once as a warning and ignored. An adapter that
fails to load is logged (once per version of the files) and tried again later; the
previous one keeps serving. Each load is logged to the server's log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.models.adapter_files import CONFIG_FILE, WEIGHTS_FILE
from chatforge.models.meta import META_FILE
from chatforge.publish import (
    PublishError,
    ServedAdapter,
    check_name,
    output_state,
    publish_with,
)
from chatforge.server.errors import APIError

log = logging.getLogger("uvicorn.error")  # the server's log, as uvicorn prints it

RETRY_S = 30.0
"""Seconds before an adapter that failed to load (unchanged since) is tried again."""


@dataclass
class Watched:
    """One watched directory and what was last seen in it."""

    name: str
    directory: Path
    seen: tuple | None = None  # the files' signature when last looked at
    done: tuple | None = None  # the signature last served, or ignored (a full model)
    failed: tuple | None = None  # the signature whose last try failed
    failed_at: float = 0.0  # when it failed
    error: str | None = None  # the last failure logged (not logged again)


def signature(directory: Path) -> tuple | None:
    """(mtime, size) of the output's files; None while there is no ``chatforge.json``."""
    out = []
    for name in (META_FILE, CONFIG_FILE, WEIGHTS_FILE):
        try:
            st = (directory / name).stat()
        except OSError:
            if name == META_FILE:
                return None
            out.append(None)
            continue
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


class PoolOps:
    """:class:`chatforge.publish.AdapterOps` on the server's own pool, for a worker
    thread: each step runs on the event loop (which owns the pool) and is waited for."""

    def __init__(self, state: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop

    def _run(self, coro: Awaitable[Any]) -> Any:
        if self.state.draining or self.loop.is_closed():
            coro.close()  # type: ignore[attr-defined]
            raise PublishError("the server is shutting down")
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()  # type: ignore[arg-type]
        except APIError as e:
            raise PublishError(e.message) from None

    async def _served(self) -> dict[str, ServedAdapter]:
        pool = self.state.pool
        return {
            r.name: ServedAdapter(r.name, r.adapter_dir, self.state.base_name(r))
            for r in pool.routes
            if r.adapter is not None
        }

    async def _names(self) -> set[str]:
        return {n for r in self.state.pool.routes for n in r.names}

    def served(self) -> dict[str, ServedAdapter]:
        return self._run(self._served())

    def names(self) -> set[str]:
        return self._run(self._names())

    def add(self, name: str, path: Path, base: str | None) -> None:
        self._run(self.state.pool.add_adapter(name, path, base))

    def remove(self, name: str) -> None:
        self._run(self.state.pool.remove_adapter(name))


class AdapterWatcher:
    """Polls ``watches`` (``(name, directory)`` pairs) every ``interval`` seconds and
    serves what finished there; see the module docstring. Run :meth:`run` as a task."""

    def __init__(
        self, state: Any, watches: Iterable[tuple[str, Path]], interval: float = 2.0
    ) -> None:
        self.state = state
        self.interval = interval
        self.watched = [Watched(check_name(n, "--watch"), Path(d)) for n, d in watches]

    async def run(self) -> None:
        """Look at every directory, then sleep ``interval``; until cancelled."""
        while True:
            for w in self.watched:
                try:
                    await self.look(w)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - one directory's trouble stops no watch
                    self._fail(w, f"{type(e).__name__}: {e}")
            await asyncio.sleep(self.interval)

    async def look(self, w: Watched) -> None:
        """One look at ``w``: serve its output when it is new, finished and settled."""
        sig = signature(w.directory)
        settled, w.seen = sig == w.seen, sig
        if sig is None or sig == w.done or not settled:
            return  # nothing yet, nothing new, or still being written: look again later
        if sig == w.failed and time.monotonic() - w.failed_at < RETRY_S:
            return  # failed as it is: again in a while (an adapter in use, say)
        state = output_state(w.directory)
        if state == "unfinished":
            return
        if state == "full":
            w.done = sig
            log.warning(
                "--watch %s: %s holds a full model, not a LoRA adapter: ignored (serve it "
                "with `chatforge serve -m %s`)",
                w.name,
                w.directory,
                w.directory,
            )
            return
        if state != "lora":
            return
        ops = PoolOps(self.state, asyncio.get_running_loop())
        try:
            result = await asyncio.to_thread(publish_with, ops, w.name, w.directory)
        except PublishError as e:
            self._fail(w, str(e))
            return
        w.done, w.failed, w.error = sig, None, None
        log.info("--watch: %s", result.describe())

    def _fail(self, w: Watched, message: str) -> None:
        """Log a failure once (until it changes); the previous adapter keeps serving."""
        w.failed, w.failed_at = w.seen, time.monotonic()
        if message != w.error:
            w.error = message
            log.error("--watch %s: could not serve %s: %s", w.name, w.directory, message)
