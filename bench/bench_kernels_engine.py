"""Two builds of the kernels in one process, interleaved, on the whole engine.

Loads SmolLM2 once, then alternates the kernel library (``--lib`` paths; "installed"
is the one chatforge picks) round by round and times, per round and library: the
prefill of a ~500-token prompt (TTFT without sampling), batch-1 decode and batch-32
decode (aggregate tokens/s, the batch's prompts' prefill subtracted). Prints the
median (min-max) per library and the ratios to the first. Ratios measured this way
hold on a busy machine; absolute figures do not.

    python bench/bench_kernels_engine.py --lib /tmp/base.so --lib installed --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chatforge.bench.decode import _ChatforgeRun, _long_prompt, _prompts
from chatforge.models import load_model
from chatforge.models.fast import native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process' CPU time (with --threads 1: robust to other processes)",
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--b1-tokens", type=int, default=64)
    ap.add_argument("--b32-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    installed = native.kernels()
    libs = {p: installed if p == "installed" else native.load_library(p) for p in args.lib}
    loaded = load_model(args.model, fast=True)
    run = _ChatforgeRun(loaded)
    long_ids = _long_prompt(loaded, 500)
    b1, b32 = _prompts(loaded, 1), _prompts(loaded, 32)
    figures: dict[str, dict[str, list[float]]] = {p: {} for p in libs}
    clock = time.process_time if args.cpu_time else time.perf_counter

    def put(p: str, key: str, value: float) -> None:
        figures[p].setdefault(key, []).append(value)

    for lib in libs.values():  # warm-up of each
        native.kernels = lambda lib=lib: lib
        run.generate([long_ids[:64]], 4)
    for r in range(args.rounds):
        for p, lib in libs.items():
            native.kernels = lambda lib=lib: lib
            t0 = clock()
            run.prefill(long_ids)
            put(p, "TTFT ms (prefill 500)", (clock() - t0) * 1000)
            for name, prompts, n in (("b1", b1, args.b1_tokens), ("b32", b32, args.b32_tokens)):
                t0 = clock()
                run.generate(prompts, 1)
                first = clock() - t0
                t0 = clock()
                run.generate(prompts, n)
                total = clock() - t0
                put(p, f"{name} tok/s", len(prompts) * (n - 1) / max(total - first, 1e-9))
        print(f"round {r + 1} done", flush=True)
    first = next(iter(libs))
    how = "CPU time" if args.cpu_time else "wall time"
    print(f"threads {torch.get_num_threads()}, {how}, {len(long_ids)}-token prompt")
    for key in figures[first]:
        base = statistics.median(figures[first][key])
        for p in libs:
            v = figures[p][key]
            med = statistics.median(v)
            print(
                f"{key:24s} {p:40s} median {med:8.1f} (min {min(v):.1f}, max {max(v):.1f})"
                f"  x{med / base:.3f} vs {first}"
            )


if __name__ == "__main__":
    main()
