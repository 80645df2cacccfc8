"""Decoding speed when another process holds a core: the thread policy against a fixed count.

SmolLM2-135M (fp32 + int8), batch 1, greedy, 128 new tokens with EOS ignored.
Each setting is timed on a warm engine twice: on the machine as it is
("quiet"), then with a competing busy loop (``python -c "while True: pass"``)
pinned to our last CPU ("busy"). We report tokens/s and the ratio busy/quiet of:

- ``auto``: ``EngineConfig(threads=None)``, the default: as many threads as
  the cores other processes leave free (:class:`chatforge.threads.ThreadPolicy`);
- ``threads=N``: a fixed count (``--fixed``, default 2, the old default).

The "others" column is how many cores other processes kept busy during the
run (from ``/proc``): the machine we build on is shared, so "quiet" may not be.
A run is cut at ``--max-seconds`` (a collapsed setting would take minutes),
so the whole benchmark stays under ~3 minutes. OpenMP reads
``OMP_WAIT_POLICY`` when torch loads, so compare wait policies by running
this script under each (the header shows the one in effect)::

    python bench/bench_busy.py --json bench/results/busy.json
    OMP_WAIT_POLICY=ACTIVE python bench/bench_busy.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import chatforge  # first: it may set OMP_WAIT_POLICY before torch loads
from chatforge.conversation import Message
from chatforge.generation.config import GenerationConfig
from chatforge.generation.engine import Engine, EngineConfig
from chatforge.generation.types import Request
from chatforge.threads import proc_sampler

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def decode_rate(lm, ids: list[int], threads: int | None, tokens: int, max_s: float) -> dict:
    """Warm up a fresh engine, then time one greedy generation of ``tokens`` tokens."""
    engine = Engine.from_loaded(lm, EngineConfig(prefix_cache=False, threads=threads))
    engine.stop_token_ids = set()  # the same token count for every setting
    warm = GenerationConfig(temperature=0, max_new_tokens=16)
    engine.generate([Request(ids, warm)])  # first calls allocate; auto takes a first look
    sampler = proc_sampler()
    before = sampler() if sampler else None
    n = 0
    t0 = time.perf_counter()
    stream = engine.stream([Request(ids, GenerationConfig(temperature=0, max_new_tokens=tokens))])
    for ev in stream:
        n += len(ev.tokens)
        if time.perf_counter() - t0 > max_s:
            stream.close()  # collapsed: the rate so far is the answer
            break
    elapsed = time.perf_counter() - t0
    others = None
    if sampler and before:
        after = sampler()
        cores = engine.threads.cores or 1
        ticks = max(after.total - before.total, 1)
        others = max(0.0, (after.busy - before.busy) - (after.ours - before.ours)) * cores / ticks
    return {
        "tokens": n,
        "seconds": round(elapsed, 3),
        "tok_s": n / elapsed,
        "threads_end": engine.threads.current,
        "others_cores": None if others is None else round(others, 2),
        "cut": n < tokens,
    }


def start_competitor() -> subprocess.Popen:
    """A busy loop on our last CPU (where one of our threads would run)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [1]
    try:
        os.sched_setaffinity(proc.pid, {cpus[-1]})
    except (AttributeError, OSError):
        pass  # not Linux: the scheduler places it
    time.sleep(0.3)  # let it start spinning
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    ap.add_argument("--fixed", type=int, default=2, help="the fixed thread count to compare")
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the best counts")
    ap.add_argument("--max-seconds", type=float, default=12.0, help="cut a run after this")
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    args = ap.parse_args()

    t_start = time.perf_counter()
    lm = chatforge.load_model(args.model, dtype="fp32", quantize="int8")
    ids = lm.format.encode([Message("user", PROMPT)]).input_ids
    settings: list[tuple[str, int | None]] = [("auto", None), (f"threads={args.fixed}", args.fixed)]
    cells: dict[tuple[str, str], dict] = {}

    def run(load: str) -> None:
        for name, threads in settings:
            runs = [
                decode_rate(lm, ids, threads, args.tokens, args.max_seconds)
                for _ in range(args.repeats)
            ]
            best = max(runs, key=lambda r: r["tok_s"])
            cells[name, load] = {**best, "all_tok_s": [round(r["tok_s"], 1) for r in runs]}

    run("quiet")
    competitor = start_competitor()
    try:
        run("busy")
    finally:
        competitor.kill()
        competitor.wait()

    policy = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    print(
        f"{args.model} fp32+int8, batch 1, {args.tokens} tokens, OMP_WAIT_POLICY={policy}, "
        f"{os.cpu_count()} CPUs, best of {args.repeats}"
    )
    head = f"{'setting':<12}{'quiet tok/s':>12}{'busy tok/s':>12}{'busy/quiet':>12}"
    print(head + f"{'threads q/b':>13}{'others q/b':>12}")
    rows = []
    for name, _ in settings:
        q, b = cells[name, "quiet"], cells[name, "busy"]
        ratio = b["tok_s"] / q["tok_s"]
        cut = " (cut)" if b["cut"] else ""
        print(
            f"{name:<12}{q['tok_s']:>12.1f}{b['tok_s']:>12.1f}{ratio:>12.2f}"
            f"{q['threads_end']:>7}/{b['threads_end']:<5}"
            f"{q['others_cores']!s:>6}/{b['others_cores']!s:<5}{cut}"
        )
        rows.append({"setting": name, "quiet": q, "busy": b, "ratio": round(ratio, 3)})
    quiet_others = max(cells[n, "quiet"]["others_cores"] or 0.0 for n, _ in settings)
    if quiet_others > 0.3:
        print(f"note: other processes used {quiet_others:.2f} cores during the quiet runs")
    total = time.perf_counter() - t_start
    print(f"({total:.0f} s in all)")
    if args.json:
        out = {
            "model": args.model,
            "tokens": args.tokens,
            "omp_wait_policy": policy,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "results": rows,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
