"""The training progress bar (rich): step, loss, tokens/s and time left."""

from __future__ import annotations

from typing import Any


class TrainProgress:
    """A rich progress bar over steps (or, under ``--max-time`` alone, over the time)."""

    def __init__(self, console: Any, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._by_time = False

    def start(self, total_steps: int | None, max_minutes: float | None, done: int) -> None:
        if not self.enabled:
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

    def update(self, step: int, loss: float, tokens_per_s: float, elapsed: float) -> None:
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
            self._progress.stop()
            self._progress = None
