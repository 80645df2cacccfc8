"""Per-token cost of structured output: batch-1 decode with and without a JSON Schema.

SmolLM2-135M (the default: fp32 + int8), greedy, one request at a time. The
same prompt is decoded

- ``free``: no constraint, EOS ignored, ``--tokens`` tokens;
- ``json_schema``: replies constrained to ``{"story": string of >= 300 characters}``
  (so the reply runs to about the budget and closes inside the last 64 tokens,
  where the closing estimate runs every step), ``--tokens`` budget.

The figure is the time per generated token after the first (the first includes
the prefill): ``(t_last - t_first) / (tokens - 1)``. Settings are interleaved
``--rounds`` times in one process and the median is reported, with the
overhead ratio and the time spent in the grammar processor itself.

    python bench/bench_structured.py --json bench/results/structured.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import chatforge  # noqa: F401 - first: it may set OMP_WAIT_POLICY before torch loads
from chatforge.conversation import Message
from chatforge.generation.config import GenerationConfig
from chatforge.generation.engine import Engine, EngineConfig
from chatforge.generation.grammar import GrammarConstraint
from chatforge.generation.types import Request
from chatforge.models.loading import load_model

PROMPT = "Write a short story about a lighthouse keeper. Answer in JSON."
SCHEMA = {
    "type": "object",
    # minLength: the reply runs (nearly) to the budget, as the free one does
    "properties": {"story": {"type": "string", "minLength": 300}},
    "required": ["story"],
    "additionalProperties": False,
}


class _Timer:
    """Wraps GrammarConstraint.process to add up the time spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._orig = GrammarConstraint.process.__func__

        def timed(cls, procs, views, logits):
            t0 = time.perf_counter()
            try:
                return self._orig(cls, procs, views, logits)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        GrammarConstraint.process = classmethod(timed)


def per_token(engine: Engine, ids: list[int], config: GenerationConfig) -> tuple[float, int]:
    """(seconds per token after the first, tokens) of one request."""
    stamps: list[float] = []
    for ev in engine.stream([Request(ids, config)]):
        stamps += [time.perf_counter()] * len(ev.tokens)
    n = len(stamps)
    return (stamps[-1] - stamps[0]) / max(1, n - 1), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    lm = load_model(args.model)
    ids = list(lm.format.encode([Message("user", PROMPT)]).input_ids)
    timer = _Timer()
    free_engine = Engine.from_loaded(lm, EngineConfig(prefix_cache=False))
    free_engine.stop_token_ids = set()  # the free run always makes --tokens tokens
    json_engine = Engine.from_loaded(lm, EngineConfig(prefix_cache=False))
    free = GenerationConfig(temperature=0, max_new_tokens=args.tokens)
    constrained = free.replace(json_schema=SCHEMA)
    per_token(free_engine, ids, free.replace(max_new_tokens=8))  # warm up both paths
    per_token(json_engine, ids, constrained.replace(max_new_tokens=8))

    runs: dict[str, list[float]] = {"free": [], "json_schema": []}
    tokens: dict[str, int] = {}
    grammar_s = 0.0
    for _ in range(args.rounds):
        s, tokens["free"] = per_token(free_engine, ids, free)
        runs["free"].append(s)
        before = timer.seconds
        s, tokens["json_schema"] = per_token(json_engine, ids, constrained)
        runs["json_schema"].append(s)
        grammar_s += (timer.seconds - before) / max(1, tokens["json_schema"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "model": args.model,
        "machine": platform.processor() or platform.machine(),
        "tokens": tokens,
        "rounds": args.rounds,
        "ms_per_token": {k: round(v * 1000, 3) for k, v in med.items()},
        "tok_per_s": {k: round(1 / v, 1) for k, v in med.items()},
        "overhead": round(med["json_schema"] / med["free"] - 1, 4),
        "grammar_ms_per_token": round(grammar_s / args.rounds * 1000, 3),
        "all_ms": {k: [round(x * 1000, 2) for x in v] for k, v in runs.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
