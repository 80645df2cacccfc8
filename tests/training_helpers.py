"""Small data files and configs shared by the tests/test_training_*.py files."""

from __future__ import annotations

import json
from pathlib import Path

PAIRS = [
    ("hello there", "hi! how are you?"),
    ("what is your name", "i am a small bot"),
    ("do you like tea", "yes, green tea"),
    ("good night", "sleep well"),
]


def write_convmodel(path: Path, n: int = 24, bad_lines: int = 0) -> Path:
    """n conversations as lists of strings, plus ``bad_lines`` malformed lines at the end."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            u, a = PAIRS[i % len(PAIRS)]
            f.write(json.dumps([f"{u} {i}", a, "thanks", "you are welcome"]) + "\n")
        for _ in range(bad_lines):
            f.write("{not json\n")
    return path


def write_openai(path: Path, n: int = 4) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            u, a = PAIRS[i % len(PAIRS)]
            msgs = [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": u},
                {"role": "assistant", "content": a},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def write_sharegpt(path: Path, n: int = 4) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            u, a = PAIRS[i % len(PAIRS)]
            conv = [{"from": "human", "value": u}, {"from": "gpt", "value": a}]
            f.write(json.dumps({"conversations": conv}) + "\n")
    return path


def tiny_config(data: Path, output: Path, model: Path, **kw):
    """A TrainConfig that trains a tiny model for a few steps in about a second."""
    from chatforge.training.config import TrainConfig

    base = dict(
        data=[str(data)],
        output=str(output),
        model=str(model),
        max_steps=4,
        batch_size=2,
        context=64,
        log_every=1,
        eval_every=0,
        save_every=0,
        precision="fp32",
        progress=False,
        lr=1e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def loss_and_grads(model, batch: dict):
    """The summed loss of ``batch`` (training's head + loss) and every weight's gradient."""
    from chatforge.training.loss import forward_loss

    model.zero_grad(set_to_none=True)
    loss = forward_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
