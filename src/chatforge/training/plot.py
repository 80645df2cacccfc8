"""The loss curve: ``metrics.jsonl`` as a PNG (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.fsutil import atomic_file


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a torn last line, from a crash, is ignored)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        return []
    return rows


def plot_losses(metrics: str | Path, png: str | Path, title: str = "") -> bool:
    """Draw training and validation loss against the step (a DPO run: its loss and, in a
    second panel, the reward margin); False when there is nothing yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not valid:
        return False
    margins = [(r["step"], r["reward_margin"]) for r in rows if "reward_margin" in r]
    val_margins = [(r["step"], r["val_reward_margin"]) for r in rows if "val_reward_margin" in r]
    if margins or val_margins:  # DPO: loss over pairs, and the reward margin beside it
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        if margins:
            ax2.plot(*zip(*margins, strict=True), label="train reward margin", linewidth=1)
        if val_margins:
            ax2.plot(*zip(*val_margins, strict=True), "o-", label="validation", linewidth=1.5)
        ax2.set_xlabel("step")
        ax2.set_ylabel("reward margin (chosen - rejected)")
        ax2.grid(alpha=0.3)
        ax2.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("DPO loss (per pair)" if margins or val_margins else "loss (nats/token)")
    ax.set_title(title or "chatforge training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(png, "wb") as f:  # a viewer never sees half a PNG
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return True
