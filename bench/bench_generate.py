"""Batch generation throughput: ``generate_batch`` against one-at-a-time transformers ``generate``.

Both run in one process, on the same prompts (chitchat openings when the
``chitchat-dataset`` package is installed, else a fixed list), greedy, with the
same ``max_new_tokens``; each stops at the end-of-turn token. We report
generated tokens per second of each, their ratio, and how many replies came
out identical (greedy decoding should agree, batched or not).

    python bench/bench_generate.py --prompts 64 --max-new-tokens 64 --batch-size 16
    python bench/bench_generate.py --write-prompts prompts.jsonl --prompts 200  # and exit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

FALLBACK_PROMPTS = [
    "Hi! How are you doing today?",
    "Hello, what did you do this weekend?",
    "Hey there, do you have any pets?",
    "Good morning! What are you having for breakfast?",
    "Hi, what kind of music do you like?",
    "Hello! Have you seen any good movies lately?",
    "Hey, what's your favourite season and why?",
    "Hi there, do you like to cook?",
]


def chitchat_openings(n: int) -> list[dict]:
    """The first ``n`` distinct conversation openings of the chitchat dataset.

    An opening is the first speaker's first burst of messages, joined by
    spaces; records are ``{"id": conversation id, "text": opening}``.
    Falls back to a fixed list (cycled) when the package is not installed.
    """
    try:
        import chitchat_dataset
    except ImportError:
        print("chitchat-dataset not installed: using a fixed prompt list", file=sys.stderr)
        return [
            {"id": f"p{i}", "text": FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)]} for i in range(n)
        ]
    path = Path(chitchat_dataset.__file__).parent / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    seen: set[str] = set()
    out: list[dict] = []
    for key, convo in data.items():
        burst = convo["messages"][0] if convo.get("messages") else []
        text = " ".join(m["text"].strip() for m in burst if m.get("text", "").strip())
        if len(text.split()) < 2 or text.lower() in seen:
            continue  # "hi" alone says too little to answer
        seen.add(text.lower())
        out.append({"id": key, "text": text})
        if len(out) == n:
            break
    return out


def hf_one_at_a_time(loaded, prompts: list[list[int]], max_new_tokens: int):
    """transformers ``generate``, greedy, one prompt per call: (texts, tokens, seconds)."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    stops = sorted(loaded.format.stop_token_ids())
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    texts, tokens = [], 0
    t0 = time.perf_counter()
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=pad,
            )
        new = out[0, len(ids) :].tolist()
        if new and new[-1] in stops:
            new = new[:-1]  # the stop token is not part of the reply (nor counted by ours)
        tokens += len(new)
        texts.append(tok.decode(new, skip_special_tokens=True))
    return texts, tokens, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="fp32", help="chatforge's dtype (auto: as the CLI)")
    ap.add_argument("--quantize", default="none", help="chatforge's weights (auto: as the CLI)")
    ap.add_argument("--prompts", type=int, default=64, help="number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    ap.add_argument("--out", default="bench/results/generate.json", help="JSON results file")
    ap.add_argument("--write-prompts", help="write the prompts to this .jsonl/.txt and exit")
    args = ap.parse_args()

    records = chitchat_openings(args.prompts)
    if args.write_prompts:
        path = Path(args.write_prompts)
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write((json.dumps(r) if path.suffix == ".jsonl" else r["text"]) + "\n")
        print(f"wrote {len(records)} prompts to {path}")
        return 0

    import torch

    from chatforge import GenerationConfig, Message, generate_batch, load_model

    if args.threads:
        # On a shared machine two threads can lose badly to one (a core is busy elsewhere).
        torch.set_num_threads(args.threads)

    # transformers always runs the fp32 weights (dtype auto loads them in fp32); our
    # side runs what `chatforge generate` runs by default unless told otherwise.
    loaded = load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    prompts = [loaded.format.encode([Message("user", r["text"])]).input_ids for r in records]
    config = GenerationConfig(temperature=0, max_new_tokens=args.max_new_tokens)

    # Warm both paths up (first-call allocations, lazy imports) on one short prompt.
    hf_one_at_a_time(loaded, prompts[:1], 4)
    with tempfile.TemporaryDirectory() as tmp:
        generate_batch(
            loaded, records[:2], Path(tmp) / "w.jsonl", config=config.replace(max_new_tokens=4),
            progress=False,
        )  # fmt: skip

    print(f"transformers generate, one at a time: {len(prompts)} prompts ...", file=sys.stderr)
    hf_texts, hf_tokens, hf_seconds = hf_one_at_a_time(loaded, prompts, args.max_new_tokens)
    print(f"chatforge generate_batch, batch {args.batch_size} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        summary = generate_batch(
            loaded, records, out, config=config, batch_size=args.batch_size, progress=False
        )
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    ours = [r["output"] for r in rows]
    identical = sum(a.strip() == b.strip() for a, b in zip(ours, hf_texts, strict=True))

    hf_tps = hf_tokens / hf_seconds
    our_tps = summary.completion_tokens / summary.seconds
    result = {
        "model": loaded.info.name,
        "dtype": loaded.info.dtype,
        "quantize": loaded.info.quantize,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "prompt_source": "chitchat openings" if records[0]["id"] != "p0" else "fixed list",
        "hf_one_at_a_time": {
            "tokens": hf_tokens,
            "seconds": round(hf_seconds, 2),
            "tokens_per_s": round(hf_tps, 1),
        },
        "chatforge_batched": {
            "tokens": summary.completion_tokens,
            "seconds": round(summary.seconds, 2),
            "tokens_per_s": round(our_tps, 1),
            "records_per_s": round(summary.records_per_second, 2),
        },
        "speedup_tokens_per_s": round(our_tps / hf_tps, 2),
        "speedup_wall": round(hf_seconds / summary.seconds, 2),
        "identical_replies": identical,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(
        f"\nhf generate one at a time: {hf_tps:.1f} tok/s; chatforge batched "
        f"(batch {args.batch_size}): {our_tps:.1f} tok/s; {our_tps / hf_tps:.1f}x "
        f"({identical}/{len(prompts)} replies identical)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
