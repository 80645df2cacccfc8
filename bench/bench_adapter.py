"""A LoRA adapter on the fast path against its base (issue 29 item 4).

Measures, in one run with the two interleaved round by round:

* load time: ``load_model(<LoRA directory>)`` against ``load_model(<base>)``, each in a
  fresh process (the time of the call only, not Python's imports), both after one
  warm-up load so the model cache is built;
* decode speed at batch 1 (and a batch of ``--batch`` rows): the same engine generating
  the same greedy tokens with the adapter applied per request and without it.

The adapter is made here with peft (rank ``--rank`` on every linear of the model, A as
peft starts it, B random at the scale a short fine-tune reaches), so the run needs no
training; a directory given with ``--adapter`` is used instead.

    python bench/bench_adapter.py --rounds 5 --json bench/results/adapter.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD_SNIPPET = """
import sys, time
t0 = time.perf_counter()
from chatforge import load_model
t1 = time.perf_counter()
load_model(sys.argv[1])
print(time.perf_counter() - t1)
"""


def make_adapter(base: str, out: Path, rank: int, seed: int = 0) -> Path:
    """A peft LoRA adapter of ``base`` (every linear, rank ``rank``) saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from chatforge.models.loading import load_transformers
    from chatforge.models.resolve import resolve

    model = load_transformers(resolve(base)[0], "fp32")
    peft = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    peft.save_pretrained(out)
    conf = json.loads((out / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(conf))
    return out


def load_seconds(ref: str) -> float:
    """Seconds ``load_model(ref)`` takes in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SNIPPET, ref], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def decode_rate(eng, prompt: list[int], tokens: int, batch: int, adapter: str | None) -> float:
    """Tokens per second of ``batch`` greedy rows decoding ``tokens`` tokens each: the
    batch over the median time of a decode step (the prompt's prefill left out; the
    median, so a step the OS took the core from does not count)."""
    from chatforge import GenerationConfig, Request

    cfg = GenerationConfig(temperature=0, max_new_tokens=tokens)
    for _ in range(batch):
        eng.add(Request(list(prompt), cfg, adapter=adapter))
    steps: list[float] = []
    started = False
    while eng.has_work:
        t0 = time.perf_counter()
        events = eng.step()
        dt = time.perf_counter() - t0
        if started:
            steps.append(dt)
        started = started or any(e.tokens for e in events)
    return batch / statistics.median(steps)


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapter", help="a LoRA directory of --model (default: made here)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-load", action="store_true", help="skip the load-time rounds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from chatforge import load_model
    from chatforge.generation.engine import Engine, EngineConfig
    from chatforge.models.fast.native import kernel_path

    tmp = tempfile.TemporaryDirectory()
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is None:
        adapter = make_adapter(args.model, Path(tmp.name) / "adapter", args.rank)

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    result: dict = {"model": args.model, "rank": args.rank, "cpu": cpu, "kernels": kernel_path()}
    print(f"{cpu}, kernels {result['kernels']}")
    if not args.no_load:
        load_seconds(args.model), load_seconds(str(adapter))  # warm: caches built
        base_s, lora_s = [], []
        for _ in range(args.rounds):
            base_s.append(load_seconds(args.model))
            lora_s.append(load_seconds(str(adapter)))
        result["load_s"] = {"base": base_s, "lora_dir": lora_s}
        print(f"load s  base {_fmt(base_s)}  LoRA directory {_fmt(lora_s)}")

    lm = load_model(args.model)
    eng = Engine.from_loaded(lm, EngineConfig(threads=args.threads, prefix_cache=False))
    eng.stop_token_ids = set()  # fixed-length runs
    name = eng.add_adapter(adapter, "a")
    prompt = lm.tokenizer.encode("Tell me a long story about a lighthouse keeper.")
    rates: dict[str, list[float]] = {}
    for batch in sorted({1, args.batch}):
        decode_rate(eng, prompt, 8, batch, None), decode_rate(eng, prompt, 8, batch, name)
        for _ in range(args.rounds):
            for key, who in (("base", None), ("lora", name)):
                rates.setdefault(f"{key}_b{batch}", []).append(
                    decode_rate(eng, prompt, args.tokens, batch, who)
                )
        base, lora = rates[f"base_b{batch}"], rates[f"lora_b{batch}"]
        ratios = [b / a for a, b in zip(base, lora, strict=True)]
        print(
            f"batch {batch}: base {_fmt(base)} tok/s, adapter {_fmt(lora)} tok/s, "
            f"adapter/base {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f})"
        )
        result[f"batch{batch}"] = {"base": base, "lora": lora, "ratios": ratios}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
