"""chatforge on a CUDA GPU against transformers on the same GPU, in one run.

Decoding (greedy, EOS ignored so both produce the same number of tokens): tokens/s
at batch 1 and batch 32, and time to first token at batch 1, for chatforge's engine
(``--device cuda``: the fast decoder's torch forward, bf16 where supported) and for
transformers' ``generate`` (same dtype, same device, SDPA attention, a static-shape
left-padded batch). Then a LoRA and a full fine-tuning run of a few steps through
``chatforge.training.train`` (tokens/s, peak GPU memory against the estimate).
Ratios are measured in this one process; the JSON goes to stdout (and ``--out``).

    python bench/bench_gpu.py                       # SmolLM2-135M, bf16
    python bench/bench_gpu.py --model DIR --new 128 --out bench/results/gpu.json

Needs a CUDA build of torch and a GPU; says so and exits 2 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Tell me a long story about a lighthouse keeper and a fox."


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(ids: list[int], batch: int) -> list[list[int]]:
    """``batch`` distinct prompts (one different first token each) of the same length."""
    return [[(i % 50) + 10, *ids] for i in range(batch)]


def chatforge_decode(lm, ids: list[int], batch: int, new: int) -> dict:
    from chatforge import Engine, GenerationConfig, Request
    from chatforge.generation.engine import EngineConfig

    # a fresh engine without the prefix cache: every run prefills its prompts
    eng = Engine.from_loaded(lm, EngineConfig(max_batch=max(32, batch), prefix_cache=False))
    eng.stop_token_ids = set()
    eng.generate([Request([9, *ids], GenerationConfig(temperature=0, max_new_tokens=4))])  # warm
    cfg = GenerationConfig(temperature=0, max_new_tokens=new)
    _sync()
    t0 = time.perf_counter()
    out = eng.generate([Request(p, cfg) for p in _prompts(ids, batch)])
    _sync()
    dt = time.perf_counter() - t0
    tokens = sum(c.completion_tokens for c in out)
    ttft = sorted(c.first_token_seconds or 0.0 for c in out)[len(out) // 2]  # median
    return {
        "tok_s": tokens / dt,
        "ttft_s": ttft,
        "seconds": dt,
        "tokens": tokens,
        "first": out[0].token_ids,
    }


def hf_decode(model, ids: list[int], batch: int, new: int) -> dict:
    import torch

    dev = next(model.parameters()).device
    x = torch.tensor(_prompts(ids, batch), device=dev)  # (B, T), no padding needed
    mask = torch.ones_like(x)

    def run(n: int):
        return model.generate(
            input_ids=x,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    run(4)  # warm
    _sync()
    t0 = time.perf_counter()
    run(1)  # the prefill and one token: time to first token
    _sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run(new)
    _sync()
    dt = time.perf_counter() - t0
    return {
        "tok_s": batch * new / dt,
        "ttft_s": ttft,
        "seconds": dt,
        "tokens": batch * new,
        "first": out[0, x.shape[1] :].tolist(),
    }


def train_run(model: str, lora: bool, steps: int, context: int) -> dict:
    import torch

    from chatforge.training.config import TrainConfig
    from chatforge.training.trainer import train

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "d.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(512):
            turns = [("user", f"Hello {i}, how are you?"), ("assistant", "Fine, thanks. And you?")]
            msgs = [{"role": r, "content": c} for r, c in turns]
            f.write(json.dumps({"messages": msgs}) + "\n")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = train(
        TrainConfig(
            data=[str(data)],
            output=str(tmp / "out"),
            model=model,
            lora=lora,
            max_steps=steps,
            batch_size=8,
            context=context,
            eval_every=0,
            save_every=0,
            progress=False,
        )
    )
    return {
        "lora": lora,
        "steps": res.steps,
        "precision": res.precision,
        "tok_s": res.tokens_per_s,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto", help="auto (bf16, else fp16), bf16, fp16, fp32")
    ap.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--train-steps", type=int, default=20, help="0: no training runs")
    ap.add_argument("--context", type=int, default=256, help="training rows' length")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    args = ap.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from chatforge import Message, load_model

    # dense weights (a GPU's only setting; on the CPU, the GPU's code path in a dry run)
    lm = load_model(args.model, dtype=args.dtype, quantize="none", device=args.device)
    ids = lm.format.encode([Message("user", PROMPT)]).input_ids
    hf = lm.model  # transformers' copy, same dtype, same GPU
    report: dict = {
        "device": lm.info.device,
        "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" else None,
        "torch": torch.__version__,
        "model": args.model,
        "dtype": lm.info.dtype,
        "new_tokens": args.new,
        "prompt_tokens": len(ids) + 1,
        "decode": [],
    }
    for batch in (int(b) for b in args.batches.split(",")):
        ours = chatforge_decode(lm, ids, batch, args.new)
        theirs = hf_decode(hf, ids, batch, args.new)
        same = sum(a == b for a, b in zip(ours.pop("first"), theirs.pop("first"), strict=False))
        report["decode"].append(
            {
                "batch": batch,
                "chatforge": ours,
                "transformers": theirs,
                "speedup": ours["tok_s"] / theirs["tok_s"],
                "first_row_same_tokens": same,
            }
        )
    if args.train_steps:
        report["train"] = [
            train_run(args.model, lora, args.train_steps, args.context) for lora in (True, False)
        ]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
