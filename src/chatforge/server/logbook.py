"""The conversation log as the server uses it: where ``POST /v1/feedback`` keeps the
judgements it is sent (``chatforge serve --no-log``: nowhere).

The log is opened on first use (so ``CHATFORGE_DATA`` is read then, and a server
nobody sends feedback to never touches it) and shared by the requests, one at a time:
each write runs on a worker thread under a lock, as SQLite wants one writer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ServerLog:
    """``path``: the log file (None: the default, in the data dir); ``enabled`` False:
    the server runs with ``--no-log`` and keeps nothing."""

    def __init__(self, path: str | Path | None = None, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled
        self._log: Any = None
        self._lock = threading.Lock()

    def run(self, work: Callable[[Any], T]) -> T:
        """``work(log)`` with the :class:`~chatforge.store.ConversationLog`, alone
        (call it on a worker thread: it blocks on the lock and the disk)."""
        from chatforge.store import ConversationLog

        if not self.enabled:
            raise RuntimeError("the server log is disabled (--no-log)")
        with self._lock:
            if self._log is None:
                self._log = ConversationLog(self.path)
            return work(self._log)

    def close(self) -> None:
        """Close the log if it was opened (at shutdown)."""
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
