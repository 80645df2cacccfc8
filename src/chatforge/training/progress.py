"""The training progress bar (rich): step, loss, tokens/s and time left.

Where the output is not a terminal (a log file, ``nohup``, CI) a live bar shows nothing
until the run ends (hours, for a long one), so there a plain line is printed instead,
at most every :data:`PLAIN_EVERY_S` seconds and at the last step.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PLAIN_EVERY_S = 30.0
"""Seconds between two progress lines where the output is not a terminal."""


class TrainProgress:
    """A rich progress bar over steps (or, under ``--max-time`` alone, over the time)."""

    def __init__(self, console: Any, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._by_time = False
        self._plain: tuple[int | None, float | None] | None = None  # (steps, minutes)
        self._printed = -math.inf  # elapsed seconds at the last plain line
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    def start(self, total_steps: int | None, max_minutes: float | None, done: int) -> None:
        if not self.enabled:
            return
        if not self.console.is_terminal:
            self._plain = (total_steps, max_minutes)
            self._printed = -math.inf
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._by_time = total_steps is None
        count = TextColumn("{task.fields[step]} steps") if self._by_time else MofNCompleteColumn()
        self._progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            count,
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        total = (max_minutes or 0) * 60 if self._by_time else total_steps
        self._task = self._progress.add_task(
            "train",
            total=total,
            completed=0 if self._by_time else done,
            step=done,
            loss="-",
            tps="-",
        )
        self._progress.start()
        self._route_logging()

    def update(self, step: int, loss: float, tokens_per_s: float, elapsed: float) -> None:
        if self._plain is not None:
            self._line(step, loss, tokens_per_s, elapsed)
        if self._progress is None:
            return
        completed = elapsed if self._by_time else step
        self._progress.update(
            self._task,
            completed=completed,
            step=step,
            loss=f"{loss:.4f}",
            tps=f"{tokens_per_s:,.0f}",
        )

    def stop(self) -> None:
        if self._progress is not None:
            for handler, stream in self._rerouted:
                handler.setStream(stream)
            self._rerouted = []
            self._progress.stop()
            self._progress = None

    def _route_logging(self) -> None:
        """Library log records (transformers, torch, peft, ...) above the bar, not through it.

        While the bar is live, rich replaces ``sys.stderr`` with a proxy that prints
        above it (so ``warnings.warn`` is already fine), but a logging handler keeps the
        stream it was made with (transformers' own handler holds the real stderr) and
        writes across the bar. Handlers writing to the terminal are pointed at the proxy
        until :meth:`stop`.
        """
        proxy = sys.stderr
        if not hasattr(proxy, "rich_proxied_file"):  # rich did not redirect: nothing to do
            return
        streams = (sys.__stderr__, sys.__stdout__, proxy.rich_proxied_file)
        real = {id(s) for s in streams if s is not None}
        loggers = [logging.getLogger()] + [
            lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
        ]
        for lg in loggers:
            for h in lg.handlers:
                if type(h) is logging.StreamHandler and id(h.stream) in real:
                    self._rerouted.append((h, h.setStream(proxy)))

    def _line(self, step: int, loss: float, tokens_per_s: float, elapsed: float) -> None:
        """A plain progress line (no terminal), at most every PLAIN_EVERY_S and at the end."""
        total, minutes = self._plain or (None, None)
        last = step == total or (minutes is not None and elapsed >= minutes * 60)
        if elapsed - self._printed < PLAIN_EVERY_S and not last:
            return
        self._printed = elapsed
        of = f"{step}/{total}" if total else str(step)
        left = ""
        if total and step:
            left = f", {_clock(elapsed / step * (total - step))} left"
        self.console.print(
            f"training: step {of}, loss {loss:.4f}, {tokens_per_s:,.0f} tok/s, "
            f"{_clock(elapsed)} elapsed{left}",
            highlight=False,
            soft_wrap=True,
        )


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


@contextmanager
def prep_progress(
    console: Any, enabled: bool, total: int, kind: str
) -> Iterator[Callable[[], None]]:
    """A context giving ``tick()``, called once per item prepared: a transient rich bar
    on a terminal, else one line (preparing is silent no more); nothing if not ``enabled``."""
    what = "texts" if kind == "text" else "conversations"
    if not enabled or not console.is_terminal:
        if enabled:
            console.print(
                f"preparing data: {total:,} {what} (cached for the next run)...", highlight=False
            )
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]preparing data"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(what),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as p:
        task = p.add_task("prep", total=total)
        yield lambda: p.advance(task)
