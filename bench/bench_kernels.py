"""Our quantised linear kernels against torch's fp32 matmul, on SmolLM2-135M's shapes.

For each weight kind (5: Q4_1 blocks, the default GGUF model's layers; 8: Q8_0, its
tied head; 9: int8 per row) and each shape (K -> N) at M = 1, 32 and 500 rows, one
process times our ``cf_qlinear`` and ``torch.nn.functional.linear`` in fp32 on the
same activations, interleaved (ours, torch, ours, torch, ...), and reports the
median of the rounds as GFLOP/s (one multiply-add of a weight and an activation = 2
ops, whatever the kernel does inside: our two activation digits do twice the integer
products) and the ratio to torch's fp32 in the same rounds.

``--lib PATH`` (repeatable) adds other builds of the kernels (e.g. the previous
commit's, built to /tmp) to the same rounds, so a change is measured against its
baseline on the same machine state.

    python bench/bench_kernels.py                        # the installed variant
    python bench/bench_kernels.py --lib /tmp/base.so --rounds 7
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import statistics
import time

import torch

from chatforge.models.fast import native
from chatforge.models.fast.linear import Int4Linear, Int8Linear

# (name, K, N): the fused linears of one SmolLM2-135M layer, and the tied head.
SHAPES = [
    ("qkv", 576, 960),
    ("out", 576, 576),
    ("gate+up", 576, 3072),
    ("down", 1536, 576),
    ("head", 576, 49152),
]


def _layer(kind: int, k: int, n: int) -> object:
    w = torch.randn(n, k) * 0.05
    if kind == 5:
        return Int4Linear(w, None)
    if kind == 9:
        return Int8Linear(w, None)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    d = (torch.rand(n, k // 32) * 1e-3).half()
    return Int8Linear.from_blocks(q, d)


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.cf_qlinear.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.cf_qlinear.argtypes += [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p]
    lib.cf_qlinear.argtypes += [ctypes.c_int]
    lib.cf_qlinear.restype = ctypes.c_int
    return lib


def _timer(fn, min_s: float, clock=time.perf_counter) -> float:
    """Seconds per call of fn: as many calls as fit in min_s (at least 2)."""
    fn()
    n, t0 = 0, clock()
    while True:
        fn()
        n += 1
        dt = clock() - t0
        if n >= 2 and dt >= min_s:
            return dt / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", action="append", default=[], help="another build to compare")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-s", type=float, default=0.15, help="time per measurement")
    ap.add_argument("--kinds", default="5,8,9")
    ap.add_argument("--rows", default="1,32,500")
    ap.add_argument("--shapes", default="", help="names from SHAPES, comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process' CPU time (with --threads 1: what the kernel costs on a "
        "shared machine, not counting the time other processes hold the core)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    clock = time.process_time if args.cpu_time else time.perf_counter
    libs = {"ours": native.kernels()}
    for i, p in enumerate(args.lib):
        libs[f"lib{i}"] = _load(p)
    clock_name = "CPU time" if args.cpu_time else "wall time"
    print(f"kernels: {native.kernel_path()}; threads {threads}; {clock_name}; extra: {args.lib}")
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    rows = []
    for kind in (int(k) for k in args.kinds.split(",")):
        for name, k, n in shapes:
            if (name == "head") != (kind == 8):
                continue  # the head is Q8_0 in the default model; layers are Q4_1 / int8
            layer = _layer(kind, k, n)
            wf = layer.dequantize()
            for m in (int(r) for r in args.rows.split(",")):
                if name == "head" and m > 32:
                    continue  # the head runs on the sampled rows only
                x = torch.randn(m, k)
                y = torch.empty(m, n)

                call = (kind, x.data_ptr(), m, k, layer.weight_q.data_ptr())
                call += (layer.scales.data_ptr(), None, n, y.data_ptr(), threads)
                fns = {key: functools.partial(lib.cf_qlinear, *call) for key, lib in libs.items()}
                fns["torch fp32"] = functools.partial(torch.nn.functional.linear, x, wf)
                times: dict[str, list[float]] = {key: [] for key in fns}
                for _ in range(args.rounds):
                    for key, fn in fns.items():
                        times[key].append(_timer(fn, args.min_s, clock))
                flops = 2.0 * m * n * k
                med = {key: statistics.median(t) for key, t in times.items()}
                row = {"kind": kind, "shape": name, "K": k, "N": n, "M": m}
                parts = []
                for key, t in med.items():
                    row[key] = {"us": t * 1e6, "gflops": flops / t / 1e9}
                    parts.append(f"{key} {flops / t / 1e9:7.1f}")
                for key in libs:
                    row[key]["x_torch"] = med["torch fp32"] / med[key]
                ratio = " ".join(f"{key}/torch {med['torch fp32'] / med[key]:.2f}x" for key in libs)
                print(f"kind {kind} {name:8s} K={k:5d} N={n:5d} M={m:4d} GFLOP/s: "
                      + " | ".join(parts) + f" | {ratio}", flush=True)  # fmt: skip
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"threads": threads, "kernels": native.kernel_path(), "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
