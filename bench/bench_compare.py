"""`chatforge compare` against the separate `chatforge generate` runs it replaces.

The grid of issue 25: 2 models x 4 settings (temperature 0.3/0.9 x top_p 0.9/1.0) x 10
prompts, ``max_new_tokens`` 48, seed 1. The models are ``smollm2`` and a named model
on it (``chatforge models create``, its own system prompt), so one process loads the
base once and runs all 80 requests through its engine together; the baseline is the
8 `chatforge generate` processes, one per (model, setting), each with its own model
load, run one after the other. Both sides are timed as whole processes (imports and
loads included), back to back, ``--rounds`` times (the machine is shared: each round
gives its own ratio). Named models live in a scratch ``CHATFORGE_DATA``::

    python bench/bench_compare.py --rounds 2 --json bench/results/compare.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one paragraph.",
    "What should I pack for a weekend hike?",
    "Suggest a name for a friendly robot.",
    "How do plants make food?",
    "Tell me a short joke about cats.",
    "Why is the sky blue?",
    "Describe a good breakfast.",
]
TEMPERATURES = ("0.3", "0.9")
TOP_PS = ("0.9", "1.0")
NAMED = "bench-pirate"
CHATFORGE = [sys.executable, "-m", "chatforge"]


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one chatforge process (it must succeed)."""
    t0 = time.perf_counter()
    subprocess.run([*CHATFORGE, *argv], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def one_round(root: Path, env: dict[str, str], max_new: int, batch: int) -> dict[str, float]:
    prompts = root / "prompts.txt"
    grid_out = root / f"grid-{time.time_ns()}.jsonl"
    compare = ["compare", "-m", "smollm2", "-m", NAMED, "-p", str(prompts), "-o", str(grid_out)]
    compare += ["--grid", f"temperature={','.join(TEMPERATURES)}"]
    compare += ["--grid", f"top_p={','.join(TOP_PS)}"]
    compare += ["--set", f"max_new_tokens={max_new}", "--seed", "1", "--no-progress"]
    compare += ["--batch-size", str(batch)]
    t_compare = timed(compare, env)
    t_generate = 0.0
    for model, (t, p) in itertools.product(
        ("smollm2", NAMED), itertools.product(TEMPERATURES, TOP_PS)
    ):
        out = root / f"gen-{time.time_ns()}.jsonl"
        argv = ["generate", str(prompts), "-o", str(out), "-m", model, "--temperature", t]
        argv += ["--top-p", p, "--max-new-tokens", str(max_new), "--seed", "1", "--no-progress"]
        t_generate += timed(argv, env)
    rows = [json.loads(line) for line in grid_out.read_text().splitlines()]
    assert len(rows) == 2 * 4 * len(PROMPTS), len(rows)
    return {
        "compare_s": round(t_compare, 2),
        "generate_8_runs_s": round(t_generate, 2),
        "ratio": round(t_compare / t_generate, 3),
        "compare_batch_size": batch,
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument(
        "--batch-size", type=int, default=16, help="compare's (generate keeps its default)"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        root = Path(tmp)
        (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        env = {**os.environ, "CHATFORGE_DATA": str(root / "data")}
        create = ["models", "create", NAMED, "--from", "smollm2"]
        create += ["--system", "You are a pirate. Answer like one, briefly."]
        subprocess.run([*CHATFORGE, *create], env=env, check=True, capture_output=True)
        timed(
            [
                "generate",
                str(root / "prompts.txt"),
                "-o",
                str(root / "warm.jsonl"),
                "--max-new-tokens",
                "4",
                "--no-progress",
            ],
            env,
        )  # conversion cache, page cache
        results = []
        for i in range(args.rounds):
            r = one_round(root, env, args.max_new_tokens, args.batch_size)
            results.append(r)
            print(
                f"round {i + 1}: compare {r['compare_s']:.1f} s, 8 x generate "
                f"{r['generate_8_runs_s']:.1f} s, ratio {r['ratio']:.2f}x "
                f"({r['completion_tokens']} tokens)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"rounds": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
