"""How many threads the forward pass uses: fixed, or what the machine leaves free.

Decoding one token crosses ~150 OpenMP barriers. When another process holds one
of our cores, every barrier waits for whichever of our threads that process
pushed off its core: measured on two cores with a busy loop beside us, 64 tokens
took 18-46 s instead of ~1 s. With one thread fewer the same run took 4-5 s. So
by default (``threads=None``) the engine uses as many threads as there are cores
that other processes are not using, measured from ``/proc`` every half second
while it steps.

Our C kernels and torch's ops both take their thread count from
``torch.get_num_threads()``, so :meth:`ThreadPolicy.apply` (called at the start
of every engine step) changes both with one ``torch.set_num_threads``.

Why not ``OMP_WAIT_POLICY=PASSIVE`` instead: measured here (SmolLM2-135M fp32 +
int8, 2 threads, batch 1), it keeps a busy machine at 39-45 tok/s where the
default spin-then-sleep fell to 1-6, but costs a quiet machine 38% (50-56
against 80-95 tok/s). Fewer threads costs nothing when the machine is quiet.

>>> policy = ThreadPolicy(threads=None)   # doctest: +SKIP
>>> policy.apply()                        # doctest: +SKIP
2
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["CpuSample", "ThreadPolicy", "proc_sampler"]

# Hysteresis. Going down happens at once, as soon as other processes use more
# than DOWN_SHARE of a core we run a thread on: too many threads is the costly
# mistake (10-40x slower, see above), and with our threads spinning on both cores
# a process that wants a whole core gets only about half of it, so waiting for a
# full core's worth of use would never trigger. Going up needs others below
# UP_SHARE of that core in two windows in a row (~1 s): too few threads costs at
# most the missing core's share, and a short burst elsewhere (a compiler, a test
# run) must not make us flap. Between the two shares the count stays as it is.
DOWN_SHARE = 0.35
UP_SHARE = 0.25


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU counters, in clock ticks, over the CPUs we may run on."""

    busy: float
    """Ticks those CPUs spent running anything (user, nice, system, irq, softirq, steal)."""
    total: float
    """Ticks those CPUs spent in any state (busy, idle, iowait)."""
    ours: float
    """Ticks this process's threads spent running (utime + stime)."""


def _allowed_cpus() -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def proc_sampler(cpus: frozenset[int] | None = None) -> Callable[[], CpuSample] | None:
    """A reader of ``/proc/stat`` and ``/proc/self/stat`` for ``cpus`` (default:
    our affinity set), or None where there is no ``/proc`` (not Linux)."""
    cpus = cpus if cpus is not None else _allowed_cpus()
    if cpus is None or not (os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")):
        return None
    names = {f"cpu{i}" for i in cpus}

    def sample() -> CpuSample:
        busy = total = 0
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break  # the cpu lines come first
                parts = line.split()
                # Per-CPU lines only, for the CPUs we may use: on a container the
                # first "cpu" line sums every CPU of the host.
                if parts[0] not in names:
                    continue
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, parts[1:9])
                # guest time is already counted in user, so it is left out.
                b = user + nice + system + irq + softirq + steal
                busy += b
                total += b + idle + iowait
        with open("/proc/self/stat", encoding="ascii", errors="replace") as f:
            # The command name (field 2) may hold spaces and ")": split after the last ")".
            fields = f.read().rsplit(")", 1)[1].split()
        ours = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
        return CpuSample(busy, total, ours)

    return sample


@dataclass
class ThreadPolicy:
    """Chooses the torch/OpenMP thread count for each engine step.

    ``threads=n``: always n. ``threads=None`` (auto): as many threads as there
    are cores other processes leave free, re-measured at most every
    ``interval`` seconds while :meth:`apply` is being called, never more than
    torch's thread count when the policy was made (so ``torch.set_num_threads``
    before making an engine caps it). Where ``/proc`` is missing, auto keeps
    that count.
    """

    threads: int | None = None
    """Fixed thread count, or None for auto."""
    interval: float = 0.5
    """Seconds between measurements (auto only)."""
    sample: Callable[[], CpuSample] | None = field(default=None, repr=False)
    """Reads the CPU counters (default: ``/proc``); injectable for tests."""
    cores: int | None = None
    """CPUs we may run on (default: our affinity set)."""
    limit: int | None = None
    """Most threads auto uses (default: ``torch.get_num_threads()`` now, at most ``cores``)."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads must be an integer >= 1 or None (got {self.threads!r})")
        if self.interval <= 0:
            raise ValueError(f"interval must be > 0 (got {self.interval})")
        if self.cores is None:
            cpus = _allowed_cpus()
            self.cores = len(cpus) if cpus else (os.cpu_count() or 1)
        if self.limit is None:
            self.limit = max(1, min(self.cores, torch.get_num_threads()))
        if self.threads is None and self.sample is None:
            self.sample = proc_sampler()
        # Cores other processes kept busy in the last window (auto; None before one).
        self.others: float | None = None
        self._current = self.threads if self.threads is not None else self.limit
        self._pending: int | None = None  # an upward count seen once, waiting for a second
        self._last: CpuSample | None = None
        self._last_t = 0.0
        self._applied_in: int | None = None  # the thread we last set the count in
        if self.threads is None and self.sample is not None:
            self._last, self._last_t = self.sample(), self.clock()

    @property
    def auto(self) -> bool:
        return self.threads is None

    @property
    def current(self) -> int:
        """The thread count chosen now (without measuring)."""
        return self._current

    def apply(self) -> int:
        """Measure if due, and make this thread's torch thread count the chosen one.

        Cheap enough for every step: a clock read and ``torch.get_num_threads()``,
        plus reading two small ``/proc`` files every ``interval`` seconds. OpenMP
        settings are per thread, so the count is set again on the first call from
        a new thread, and whenever someone else changed it.
        """
        if self.sample is not None and self.threads is None:
            now = self.clock()
            if now - self._last_t >= self.interval:
                self._measure(now)
        n = self._current
        tid = threading.get_ident()
        if tid != self._applied_in or torch.get_num_threads() != n:
            torch.set_num_threads(n)
            self._applied_in = tid
        return n

    def _measure(self, now: float) -> None:
        assert self.sample is not None and self.cores is not None
        s = self.sample()
        last, self._last, self._last_t = self._last, s, now
        if last is None:
            return
        ticks = s.total - last.total  # summed over our CPUs
        if ticks <= 0:
            return
        # Busy ticks that were not ours, per tick of one CPU: cores in use by others.
        others = max(0.0, (s.busy - last.busy) - (s.ours - last.ours)) * self.cores / ticks
        self.others = others
        self._decide(others)

    def _decide(self, others: float) -> None:
        assert self.cores is not None and self.limit is not None
        free = self.cores - others
        down = max(1, math.ceil(free - (1 - DOWN_SHARE)))  # a core counts as taken
        up = min(self.limit, math.floor(free + UP_SHARE))  # a core counts as free
        if down < self._current:
            self._current, self._pending = down, None
        elif up > self._current:
            if self._pending is not None:  # second window in a row that says "more"
                self._current, self._pending = min(self._pending, up), None
            else:
                self._pending = up
        else:
            self._pending = None
