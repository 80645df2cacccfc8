"""From judgements to a better bot, measured: DPO on a preference a small model can learn.

The synthetic judgement: of two replies of about the same length, the user prefers the
one that ends by asking the other person a question. ``--pairs`` such pairs (80 by
default: 60 to train on, 20 held out) are written as TRL conversational preference
JSONL, then:

1. ``chatforge eval`` on the held-out pairs with the base model (preference accuracy:
   how often it gives the chosen reply the higher likelihood; about chance here);
2. ``chatforge train --dpo`` (LoRA) on the training pairs;
3. ``chatforge eval -m BASE --compare OUT`` on the held-out pairs again (accuracy after,
   and the DPO reward accuracy and margin against the base);
4. sampled replies of both models to the held-out prompts: how many end with a question.

    python bench/bench_dpo.py --out /tmp/dpo-bench --steps 30
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

# (user message, the start both replies share, the question that ends the chosen one,
#  the statement that ends the rejected one); {x} is filled from the slot words.
TEMPLATES = [
    (
        "I just got back from a trip to {x}.",
        "That sounds lovely!",
        "What did you enjoy most about {x}?",
        "I have never been to {x} myself.",
    ),
    (
        "I started learning to play the {x}.",
        "That is a great thing to learn.",
        "How long have you been practising the {x}?",
        "The {x} takes a lot of practice.",
    ),
    (
        "My favourite food is {x}.",
        "Good choice, {x} is tasty.",
        "Do you cook {x} at home?",
        "Many people like {x} a lot.",
    ),
    (
        "I have been reading a book about {x}.",
        "Books about {x} can be fascinating.",
        "What have you learned about {x} so far?",
        "There is a lot written about {x}.",
    ),
    (
        "We adopted a {x} last week.",
        "Congratulations on the new {x}!",
        "What did you name your {x}?",
        "A {x} can be a lot of work at first.",
    ),
    (
        "I am thinking about taking up {x}.",
        "{X} is a fun hobby.",
        "What got you interested in {x}?",
        "Lots of people find {x} relaxing.",
    ),
    (
        "Yesterday I watched a film about {x}.",
        "Films about {x} can be moving.",
        "Would you recommend it to a friend?",
        "I do not watch many films about {x}.",
    ),
    (
        "I am planning a garden with {x}.",
        "A garden with {x} sounds beautiful.",
        "Where are you going to plant the {x}?",
        "{X} need sun and regular water.",
    ),
]
SLOTS = [
    "Italy",
    "piano",
    "pasta",
    "the ocean",
    "puppy",
    "painting",
    "space",
    "roses",
    "Japan",
    "guitar",
    "curry",
    "history",
    "kitten",
    "running",
    "dinosaurs",
    "tomatoes",
    "Norway",
    "violin",
    "sushi",
    "birds",
    "rabbit",
    "knitting",
    "volcanoes",
    "tulips",
    "Mexico",
    "drums",
    "soup",
    "chess",
    "parrot",
    "climbing",
    "whales",
    "herbs",
]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` preference pairs in TRL's conversational format (distinct prompts)."""
    rng = random.Random(seed)
    combos = [(t, s) for t in TEMPLATES for s in SLOTS]
    rng.shuffle(combos)
    out = []
    for (user, start, question, statement), x in combos[:n]:
        fill = {"x": x, "X": x[:1].upper() + x[1:]}
        out.append(
            {
                "prompt": [{"role": "user", "content": user.format(**fill)}],
                "chosen": [{"role": "assistant", "content": f"{start} {question}".format(**fill)}],
                "rejected": [
                    {"role": "assistant", "content": f"{start} {statement}".format(**fill)}
                ],
            }
        )
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def chatforge(*args: str) -> str:
    """Run the CLI, echo its stderr, return its stdout."""
    cmd = [sys.executable, "-m", "chatforge", *args]
    print("$ chatforge " + " ".join(args), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"chatforge {args[0]} failed (exit {res.returncode})")
    return res.stdout


def question_rate(replies: list[str]) -> float:
    return sum(r.strip().endswith("?") for r in replies) / max(1, len(replies))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("dpo-bench"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pairs", type=int, default=80)
    ap.add_argument("--held-out", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1, help="sampling seed of the replies")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(args.pairs)
    train, held = pairs[: -args.held_out], pairs[-args.held_out :]
    write_jsonl(args.out / "prefs.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", held)
    model_out = args.out / "dpo"

    def evaluate(*models: str) -> dict:
        compare = [a for m in models[1:] for a in ("--compare", m)]
        text = chatforge(
            "eval",
            "-m",
            models[0],
            *compare,
            "--data",
            str(args.out / "heldout.jsonl"),
            "--replies",
            str(args.held_out),
            "--max-new-tokens",
            "40",
            "--seed",
            str(args.seed),
            "--json",
        )
        return json.loads(text)

    before = evaluate(args.model)
    t0 = time.perf_counter()
    chatforge(
        "train",
        "--dpo",
        "--model",
        args.model,
        "--data",
        str(args.out / "prefs.jsonl"),
        "--lora",
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--beta",
        str(args.beta),
        "--output",
        str(model_out),
        "--overwrite",
        "--quiet",
    )
    train_s = time.perf_counter() - t0
    after = evaluate(args.model, str(model_out))
    base, tuned = after["models"]
    samples = after["samples"]
    rate_before = question_rate([s[args.model] for s in samples])
    rate_after = question_rate([s[str(model_out)] for s in samples])
    result = {
        "pairs": {"train": len(train), "held_out": len(held)},
        "train_seconds": round(train_s, 1),
        "steps": args.steps,
        "accuracy_before": before["models"][0]["accuracy"],
        "accuracy_after": tuned["accuracy"],
        "reward_accuracy": tuned["reward_accuracy"],
        "reward_margin": tuned["reward_margin"],
        "question_rate_before": rate_before,
        "question_rate_after": rate_after,
        "examples": samples[:4],
    }
    print(json.dumps(result, indent=2))
    (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
