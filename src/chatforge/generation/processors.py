"""Per-sequence logits processors: the engine's hook for constraints.

A request carries a list of processors (``Request.processors``); a config's
``json_schema`` adds a grammar (:func:`~chatforge.generation.grammar.config_processors`).
Before sampling, the engine hands every processor the logits of the sequences that carry one,
*grouped by processor class*: a class sees all its rows at once as one
``(B, V)`` tensor, so a grammar mask is one vectorised operation per step, not a
Python loop per token. A processor that only knows how to handle one row
implements :meth:`LogitsProcessor.process_row` and inherits the row loop.

Processors run after the raw logits are read for logprobs (logprobs are of
the model's own distribution, as OpenAI reports them) and before the penalties
(a config's ``logit_bias``, presence/frequency and repetition penalties),
temperature and the filters of :mod:`~chatforge.generation.sampling`, which are
sampling parameters, not processors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chatforge.errors import ParamError
from chatforge.generation.sampling import apply_logit_bias, pack_logit_bias


@dataclass(frozen=True)
class SequenceView:
    """What a processor may know of a sequence: its tokens so far and its reply budget."""

    prompt_ids: Sequence[int]
    generated_ids: Sequence[int]
    budget: int | None = None
    """Most tokens the reply may have (None: unknown)."""


class LogitsProcessor:
    """Base class: override :meth:`process` (vectorised) or :meth:`process_row`."""

    @classmethod
    def process(
        cls, procs: Sequence[LogitsProcessor], views: Sequence[SequenceView], logits: Tensor
    ) -> Tensor:
        """Rows of ``logits`` (B, V), row i belonging to ``procs[i]``; returns (B, V).

        The default calls :meth:`process_row` per row.
        """
        pairs = enumerate(zip(procs, views, strict=True))
        rows = [p.process_row(v, logits[i]) for i, (p, v) in pairs]
        return torch.stack(rows)

    def process_row(self, view: SequenceView, logits: Tensor) -> Tensor:
        """One sequence's logits (V,) -> (V,)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither process nor row")

    def validate(self, vocab_size: int) -> None:
        """Raise a ParamError (naming the setting) if this processor cannot apply to the model."""

    def bind(self, engine: Any) -> LogitsProcessor:
        """The processor one new sequence of ``engine`` uses (raising ValueError if it
        cannot apply to that model). Stateless processors are shared (``self``); one
        with per-sequence state (a grammar's parser) returns a fresh copy."""
        return self


def check_logit_bias(bias: Mapping[int, float], vocab_size: int) -> None:
    """A ParamError naming ``logit_bias`` when it names a token outside the vocabulary."""
    for tok in bias:
        if not 0 <= tok < vocab_size:
            raise ParamError(
                "logit_bias",
                f"names token {tok}, outside this model's vocabulary (0..{vocab_size - 1})",
            )


class LogitBias(LogitsProcessor):
    """Add a bias to chosen tokens' logits (OpenAI's ``logit_bias``: -100 bans, 100 forces)
    as a processor of its own; a config's ``logit_bias`` is a sampling parameter."""

    def __init__(self, bias: Mapping[int, float]) -> None:
        self.bias = {int(k): float(v) for k, v in bias.items()}

    def validate(self, vocab_size: int) -> None:
        check_logit_bias(self.bias, vocab_size)

    @classmethod
    def process(
        cls, procs: Sequence[LogitsProcessor], views: Sequence[SequenceView], logits: Tensor
    ) -> Tensor:
        # (B, K) ids and values for all rows, added in one operation.
        biases = [p.bias for p in procs if isinstance(p, LogitBias)]
        assert len(biases) == len(procs)
        return apply_logit_bias(logits, *pack_logit_bias(biases, logits.device))


def apply_processors(
    per_row: Sequence[Sequence[LogitsProcessor]], views: Sequence[SequenceView], logits: Tensor
) -> Tensor:
    """Apply each row's processors to ``logits`` (B, V), one call per processor class.

    Processors of one row run in their list order; across classes, in order of
    first appearance.
    """
    if not any(per_row):
        return logits
    # (class) -> list of (row, processor); a row's k-th processor runs in round k.
    rounds = max(len(p) for p in per_row)
    out = logits.clone()
    for k in range(rounds):
        groups: dict[type, list[tuple[int, Any]]] = {}
        for row, procs in enumerate(per_row):
            if k < len(procs):
                groups.setdefault(type(procs[k]), []).append((row, procs[k]))
        for cls, items in groups.items():
            idx = torch.tensor([r for r, _ in items], dtype=torch.long, device=out.device)
            out[idx] = cls.process([p for _, p in items], [views[r] for r, _ in items], out[idx])
    return out
