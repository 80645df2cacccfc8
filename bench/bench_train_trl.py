"""Fine-tuning speed: chatforge's trainer against TRL's ``SFTTrainer`` (+ peft), in one run.

Same model (SmolLM2-135M-Instruct, fp32), same examples (the first
``--conversations`` chitchat conversations in the model's chat template, loss on
assistant turns: chatforge tokenises them and both trainers get those tokens),
same row length, batch, steps, learning rate, AdamW betas, LoRA settings and packing, no
gradient checkpointing, fp32 on CPU. TRL packs with its default best-fit
decreasing strategy (padding-free rows); chatforge packs first-fit decreasing
with a block-diagonal mask. The rate is real (non-padding) tokens per second of
training after ``--skip`` warm-up steps; the loss is the mean training loss of
the last ``--tail`` steps (both see different row orders, so single steps differ
by noise) and, what says whether both learned the same, the loss of the trained
model on ``--held-out`` later conversations (assistant tokens), computed the same
way for both. Contenders run ``--rounds``
times, interleaved; the table gives the median round.

    python bench/bench_train_trl.py --context 256 --batch-size 4 --steps 10 --rounds 3
    python bench/bench_train_trl.py --full ...     # all weights instead of LoRA
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
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--conversations", type=int, default=231)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the rate")
    ap.add_argument("--tail", type=int, default=5, help="loss: mean of the last N steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--held-out", type=int, default=40, help="conversations after the training ones: eval loss"
    )
    ap.add_argument("--only", choices=["chatforge", "trl"], default=None)
    ap.add_argument(
        "--seed", type=int, default=0, help="both trainers' seed (row order): the loss spread"
    )
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args()

    from chatforge.conversation import get_format
    from chatforge.models import load_model
    from chatforge.training.data import Dataset, load_data
    from chatforge.training.examples import build_examples

    work = Path(tempfile.mkdtemp(prefix="bench-train-trl-"))
    full = load_data("chitchat")
    ds = Dataset("convmodel", full.conversations[: args.conversations], sources=["chitchat"])
    data = work / "data.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for conv in ds.conversations:
            msgs = [{"role": m.role, "content": m.content} for m in conv]
            f.write(json.dumps({"messages": msgs}) + "\n")
    lm0 = load_model(args.model, "fp32", "none", fast=False)
    tok = lm0.tokenizer
    examples, _ = build_examples(get_format("chat_template", tok), ds, args.context)
    flops = flops_per_token(lm0.model, examples, args.full)
    del lm0
    items = [{"input_ids": e.ids, "labels": _labels(e)} for e in examples]
    lo, hi = args.conversations, args.conversations + args.held_out
    held = Dataset("convmodel", full.conversations[lo:hi], sources=["chitchat"])
    held_ex, _ = build_examples(get_format("chat_template", tok), held, args.context)

    def eval_loss(model) -> float:
        """Mean next-token loss on the held-out examples' assistant tokens (same for both)."""
        from chatforge.training.examples import collate, pack
        from chatforge.training.loss import forward_loss

        model.eval()
        total = n = 0.0
        with torch.no_grad():
            for row in pack(held_ex, args.context, enabled=False):
                batch = collate([row], tok.pad_token_id or 0)
                total += float(forward_loss(model, batch))
                n += int((batch["targets"] != -100).sum())
        return total / n

    lora = dict(r=8, alpha=16.0, dropout=0.05)

    def ours(run: int) -> dict:
        from chatforge.training.config import TrainConfig
        from chatforge.training.trainer import train

        out = work / f"chatforge-{run}"
        result = train(
            TrainConfig(
                data=[str(data)],
                output=str(out),
                model=args.model,
                format="chat_template",
                context=args.context,
                batch_size=args.batch_size,
                max_steps=args.steps,
                lr=args.lr,
                warmup=0.0,
                min_lr_ratio=1.0,  # constant rate, like TRL's "constant" below
                weight_decay=0.0,
                eval_every=0,
                save_every=0,
                log_every=1,
                precision="fp32",
                grad_checkpointing=False,
                progress=False,
                lora=not args.full,
                lora_r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"],
                seed=args.seed,
            )
        )
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "tokens" in r]
        a, b = rows[args.skip - 1], rows[-1]
        return {
            "tokens_per_s": (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]),
            "losses": [r["loss"] for r in rows],
            "eval_loss": eval_loss(result.model),
        }

    counted = {"tokens": 0}

    def trl(run: int) -> dict:
        from datasets import Dataset as HFDataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer

        lm = load_model(args.model, "fp32", "none", fast=False)
        marks: list[tuple[float, int]] = []
        losses: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                marks.append((time.perf_counter(), counted["tokens"]))

            def on_log(self, a, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))

        cfg = SFTConfig(
            output_dir=str(work / f"trl-{run}"),
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta2=0.95,  # chatforge's AdamW betas (0.9, 0.95); TRL's default beta2 is 0.999
            max_length=args.context,
            packing=True,
            gradient_checkpointing=False,
            bf16=False,
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=args.seed,
        )
        peft_cfg = None
        if not args.full:
            peft_cfg = LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"],
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
        trainer = SFTTrainer(
            model=lm.model,
            args=cfg,
            train_dataset=HFDataset.from_list(items),
            processing_class=lm.tokenizer,
            peft_config=peft_cfg,
            callbacks=[Clock()],
        )
        collate = trainer.data_collator

        def counting(batch):
            counted["tokens"] += sum(len(b["input_ids"]) for b in batch)
            return collate(batch)

        trainer.data_collator = counting
        counted["tokens"] = 0
        trainer.train()
        # The collator runs one batch ahead of the step that ends; the tokens between two
        # marks are still those of the steps between them, one batch shifted.
        (t0, n0), (t1, n1) = marks[args.skip - 1], marks[-1]
        return {
            "tokens_per_s": (n1 - n0) / (t1 - t0),
            "losses": losses,
            "eval_loss": eval_loss(trainer.model),
        }

    contenders = {"TRL SFTTrainer": trl, "chatforge": ours}
    if args.only:
        contenders = {k: v for k, v in contenders.items() if args.only.lower() in k.lower()}
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for name, fn in contenders.items():
            res = fn(r)
            results.setdefault(name, []).append(res)
            tail = statistics.mean(res["losses"][-args.tail :])
            print(
                f"round {r + 1}: {name}: {res['tokens_per_s']:,.1f} tokens/s, "
                f"loss (last {args.tail}) {tail:.3f}, held-out loss {res['eval_loss']:.4f}, "
                f"threads {torch.get_num_threads()}",
                flush=True,
            )
    summary = {}
    for name, runs in results.items():
        rates = [x["tokens_per_s"] for x in runs]
        summary[name] = {
            "median": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "loss_tail": statistics.mean(statistics.mean(x["losses"][-args.tail :]) for x in runs),
            "loss_first": statistics.mean(x["losses"][0] for x in runs),
            "eval_loss": statistics.mean(x["eval_loss"] for x in runs),
        }
        summary[name]["gflops"] = summary[name]["median"] * flops / 1e9
    what = "full" if args.full else "LoRA r8"
    print(f"\n{what}, context {args.context}, batch {args.batch_size}, {args.steps} steps")
    print(
        f"| trainer | tokens/s median (min-max) | vs TRL | loss step 1 | loss last {args.tail} "
        "| held-out loss after | GFLOP/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = summary.get("TRL SFTTrainer", {}).get("median")
    for name, s in summary.items():
        ratio = f"{s['median'] / base:.2f}x" if base else "-"
        print(
            f"| {name} | {s['median']:,.1f} ({s['min']:,.1f}-{s['max']:,.1f}) | {ratio} "
            f"| {s['loss_first']:.3f} | {s['loss_tail']:.3f} | {s['eval_loss']:.4f} "
            f"| {s['gflops']:.0f} |"
        )
    print(
        f"(GFLOP/s: {flops / 1e6:,.0f} MFLOP per real token, linear layers and the LM head at "
        "loss positions, forward + backward; attention not counted)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "flops_per_token": flops,
                    "rounds": results,
                    "summary": summary,
                },
                indent=2,
            )
        )


def flops_per_token(model, examples, full: bool) -> float:
    """Matmul FLOPs per real token of one training step, attention left out.

    Forward 2 FLOPs per weight, backward 2 for the input gradient and, where the
    weight trains (full fine-tuning), 2 more for its gradient: 4 N (LoRA, the
    frozen base; the rank-8 adapters add < 1 %) or 6 N. The LM head runs only at
    positions with a loss, so it counts with that fraction of the tokens.
    """
    head = model.get_output_embeddings()
    linear = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    with_loss = sum(sum(e.mask) for e in examples) / max(1, sum(len(e) for e in examples))
    k = 6 if full else 4
    return k * linear + k * head.weight.numel() * with_loss


def _labels(e) -> list[int]:
    # transformers shifts labels inside the model: label[t] is the target of position t-1.
    return [t if m else -100 for t, m in zip(e.ids, e.mask, strict=True)]


if __name__ == "__main__":
    main()
