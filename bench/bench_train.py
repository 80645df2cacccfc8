"""Training throughput: chatforge's trainer against transformers' ``Trainer``, in one run.

Same model (a GPT-2 built from the same seed), same examples (chitchat
conversations rendered in the sep format, loss on assistant turns), same
batch size in rows, same number of steps, fp32 on CPU. transformers' Trainer
gets one example per row, padded to the longest in the batch (the usual
``DataCollatorForSeq2Seq``-style padding); chatforge packs several examples
per row (block-diagonal attention, no cross-example attention). We also run
chatforge with packing off, to separate the packing effect from the loop.
Throughput counts real (non-padding) tokens per second of training, after
``--skip`` warm-up steps (first-step lazy imports and allocator growth are not
training speed). Each contender runs ``--rounds`` times, interleaved; the table
gives each one's median round (min-max) and the ratio of the medians.

    python bench/bench_train.py --conversations 600 --steps 30 --batch-size 8 --context 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=600)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the rate")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)

    from chatforge.conversation import get_format
    from chatforge.training.config import TrainConfig
    from chatforge.training.data import Dataset, load_data
    from chatforge.training.examples import build_examples
    from chatforge.training.tokenizer import train_tokenizer
    from chatforge.training.trainer import train

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    full = load_data("chitchat")
    ds = Dataset("convmodel", full.conversations[: args.conversations], sources=["chitchat"])
    tok_dir = work / "tok"
    train_tokenizer(full, args.vocab_size, tok_dir)
    data = work / "data.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for conv in ds.conversations:
            f.write(json.dumps([m.content for m in conv]) + "\n")

    common = dict(
        data=[str(data)],
        init="gpt2",
        tokenizer=str(tok_dir),
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=4,
        context=args.context,
        batch_size=args.batch_size,
        max_steps=args.steps,
        eval_every=0,
        save_every=0,
        log_every=1,
        precision="fp32",
        progress=False,
        warmup=0.0,
        lr=1e-3,
    )
    results: dict[str, list[float]] = {}
    losses: dict[str, list[float]] = {}  # per round, the mean training loss of the last 10 steps

    def ours(label: str, packing: bool, run: int) -> float:
        out = work / f"{'packed' if packing else 'unpacked'}-{run}"
        train(TrainConfig(output=str(out), packing=packing, **common))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        a, b = rows[args.skip - 1], rows[-1]
        last = [r["loss"] for r in rows[-10:]]  # steps N-9..N, as the Trainer logs them
        losses.setdefault(label, []).append(sum(last) / len(last))
        return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])

    # transformers' Trainer on the same examples, model and batch size.
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(tok_dir)
    fmt = get_format("sep", tok)
    examples, _ = build_examples(fmt, ds, args.context, "assistant")
    items = [
        {"input_ids": e.ids, "token_type_ids": e.types, "labels": _labels(e)} for e in examples
    ]
    counted = {"tokens": 0}

    def collate(batch):
        n = max(len(b["input_ids"]) for b in batch)
        pad = tok.pad_token_id

        def padded(key, value):
            return torch.tensor([b[key] + [value] * (n - len(b[key])) for b in batch])

        counted["tokens"] += sum(len(b["input_ids"]) for b in batch)
        return {
            "input_ids": padded("input_ids", pad),
            "token_type_ids": padded("token_type_ids", 0),
            "labels": padded("labels", -100),
            "attention_mask": torch.tensor(
                [[1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"])) for b in batch]
            ),
        }

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, a, state, control, **kw):
            self.marks.append((time.perf_counter(), counted["tokens"]))

    def hf(run: int) -> float:
        torch.manual_seed(0)
        cfg = GPT2Config(
            vocab_size=len(tok),
            n_positions=args.context,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=4,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        targs = TrainingArguments(
            output_dir=str(work / f"hf-{run}"),
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            logging_steps=10,  # the loss row: mean training loss of the last 10 steps
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=0,
        )
        clock = Clock()
        counted["tokens"] = 0
        trainer = Trainer(
            model=GPT2LMHeadModel(cfg),
            args=targs,
            train_dataset=items,
            data_collator=collate,
            callbacks=[clock],
        )
        trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        losses.setdefault("transformers Trainer (padded)", []).append(logged[-1])  # last 10 steps
        # The collator runs one batch ahead of the step that ends; count tokens of
        # the steps between the marks, which the one-ahead offset does not change.
        (t0, n0), (t1, n1) = clock.marks[args.skip - 1], clock.marks[-1]
        return (n1 - n0) / (t1 - t0)

    contenders = {
        "transformers Trainer (padded)": hf,
        "chatforge (packed)": lambda r: ours("chatforge (packed)", True, r),
        "chatforge (no packing)": lambda r: ours("chatforge (no packing)", False, r),
    }
    for r in range(args.rounds):
        for name, fn in contenders.items():
            tps = fn(r)
            results.setdefault(name, []).append(tps)
            print(f"round {r + 1}: {name}: {tps:,.0f} tokens/s", flush=True)
    median = {name: statistics.median(v) for name, v in results.items()}
    base = median["transformers Trainer (padded)"]
    print(
        "\n| trainer | real tokens/s, median (min-max) | vs transformers Trainer "
        "| loss, last 10 steps (per round) |"
    )
    print("|---|---:|---:|---|")
    for name, tps in median.items():
        lo, hi = min(results[name]), max(results[name])
        loss = ", ".join(f"{x:.3f}" for x in losses[name])
        print(f"| {name} | {tps:,.0f} ({lo:,.0f}-{hi:,.0f}) | {tps / base:.2f}x | {loss} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "rounds": results, "median": median, "loss": losses},
                indent=2,
            )
        )


def _labels(e):
    # HF shifts labels inside the model: label[t] is the target of position t-1.
    return [t if m else -100 for t, m in zip(e.ids, e.mask, strict=True)]


if __name__ == "__main__":
    main()
