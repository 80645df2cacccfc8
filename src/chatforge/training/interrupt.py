"""Ctrl-C answered at once, even while one long torch operation runs.

Python runs a signal handler (``KeyboardInterrupt``) only when the main thread
next executes bytecode; a backward pass, or one big matrix operation, runs in C++
for seconds, and until it returns the user sees nothing. :class:`InterruptNotice`
asks the interpreter to also write the signal number to a pipe
(``signal.set_wakeup_fd``, done inside the C-level handler) and reads that pipe in
a thread, which says at once that the interrupt was seen. Torch releases the GIL in
its operations, so the thread gets to print. The ``KeyboardInterrupt`` itself still
arrives in the main thread, between two operations, where the trainer stops
cleanly (a checkpoint on Ctrl-C during training).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable


class InterruptNotice:
    """While entered (main thread only), call ``notice()`` as soon as SIGINT arrives."""

    def __init__(self, notice: Callable[[], None]) -> None:
        self.notice = notice
        self._old: int | None = None
        self._pipe: tuple[int, int] | None = None

    def __enter__(self) -> InterruptNotice:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set the wakeup fd
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(r)
            os.close(w)
            return self
        self._pipe = (r, w)
        threading.Thread(target=self._watch, args=(r,), daemon=True).start()
        return self

    def _watch(self, r: int) -> None:
        try:
            while data := os.read(r, 16):  # b"": __exit__ closed the write end
                if signal.SIGINT in data:
                    with contextlib.suppress(Exception):
                        self.notice()
        except OSError:
            pass
        finally:
            os.close(r)

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(self._old if self._old is not None else -1)
        _, w = self._pipe
        self._pipe = None
        os.close(w)  # the watcher reads end-of-file, closes its end and returns
