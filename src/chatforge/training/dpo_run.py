"""What ``train --dpo`` changes in a training run: the data (preference pairs, not
packed rows), a step's unit (pairs, not loss tokens), the loss (DPO against the
adapter switched off) and what is logged (the DPO rewards).

:class:`PreferenceRun` is what the :class:`~chatforge.training.trainer.Trainer` asks
when ``cfg.dpo`` is set; the loop, checkpoints, resume, progress, memory check and
model output are the trainer's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from chatforge.errors import ChatforgeError
from chatforge.training.dpo import batch_loss, collate_pairs
from chatforge.training.preference import (
    PairExample,
    PreferenceSet,
    encode_pairs,
    load_preferences,
)

# Running sums of a step's DPO numbers, in this order (reduced across processes).
STATS = ("pairs", "correct", "margin", "chosen", "rejected")


class PreferenceRun:
    """The DPO side of one training run (``beta``: how far from the reference it may go)."""

    def __init__(self, cfg: Any, say: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.say = say
        self.beta = cfg.beta
        self.sums = dict.fromkeys(STATS, 0.0)

    # -- data ------------------------------------------------------------------------

    def read(self, warn: Callable[[str], None]) -> tuple[PreferenceSet, PreferenceSet | None]:
        """The training pairs and the validation pairs (``--valid`` / ``--valid-split``)."""
        cfg = self.cfg
        train = load_preferences(cfg.data, cfg.on_error, warn)
        valid = load_preferences(cfg.valid, cfg.on_error, warn) if cfg.valid else None
        if valid is None and cfg.valid_split is not None:
            train, valid = train.split_tail(cfg.valid_split)
        return train, valid

    def examples(
        self, fmt: Any, context: int, train: PreferenceSet, valid: PreferenceSet | None
    ) -> tuple[list[PairExample], list[PairExample]]:
        """The pairs encoded with the model's format, and one line saying what came of them."""
        rows, st = encode_pairs(fmt, train.pairs, context)
        if not rows:
            why = f": {st.drop_reasons[0]}" if st.drop_reasons else ""
            raise ChatforgeError(f"no preference pair fits the context of {context} tokens{why}")
        vrows = encode_pairs(fmt, valid.pairs, context)[0] if valid is not None else []
        shapes = ", ".join(f"{n} {shape}" for shape, n in sorted(train.shapes.items()))
        tokens = sum(ex.tokens for ex in rows)
        self.say(
            f"data: {st.pairs:,} preference pairs ({shapes}) -> {len(rows):,} encoded, "
            f"{tokens:,} tokens; truncated {st.truncated}, dropped {st.dropped}"
            + (f" ({st.drop_reasons[0]})" if st.drop_reasons else "")
            + f"; {len(vrows)} validation pairs; beta {self.beta:g}"
        )
        return rows, vrows[: self.cfg.valid_rows]

    # -- a step ----------------------------------------------------------------------

    @staticmethod
    def units(pairs: Sequence[PairExample]) -> int:
        """What a step's loss is averaged over: pairs."""
        return len(pairs)

    @staticmethod
    def tokens(pairs: Sequence[PairExample]) -> int:
        """Real tokens fed (both rows of each pair), for tokens/s."""
        return sum(ex.tokens for ex in pairs)

    @staticmethod
    def collate(pairs: Sequence[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, pad_id)

    def loss_sum(self, model: Any, batch: dict, head_ok: bool) -> torch.Tensor:
        """The batch's DPO loss summed over its pairs; its rewards are added to the step's sums."""
        res = batch_loss(model, batch, self.beta, head_ok)
        n = len(res.chosen_rewards)
        s = self.sums
        s["pairs"] += n
        s["correct"] += float((res.margins > 0).sum())
        s["margin"] += float(res.margins.sum())
        s["chosen"] += float(res.chosen_rewards.sum())
        s["rejected"] += float(res.rejected_rewards.sum())
        return res.loss * n

    def take(self, reduce: Callable[[list[float]], list[float]]) -> dict[str, float]:
        """The metrics of the pairs seen since the last call (``reduce`` sums them over
        processes): reward accuracy and margin, mean chosen and rejected rewards."""
        sums = dict(zip(STATS, reduce([self.sums[k] for k in STATS]), strict=True))
        self.sums = dict.fromkeys(STATS, 0.0)
        n = max(1.0, sums["pairs"])
        return {
            "reward_accuracy": round(sums["correct"] / n, 4),
            "reward_margin": round(sums["margin"] / n, 5),
            "reward_chosen": round(sums["chosen"] / n, 5),
            "reward_rejected": round(sums["rejected"] / n, 5),
        }
