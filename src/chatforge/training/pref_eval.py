"""Did preference tuning work? Score held-out preference pairs with one or more models.

For each pair the model's log-likelihood of the chosen and of the rejected reply (their
tokens and end token, given the prompt) is summed. The **preference accuracy** is how
often the chosen reply gets the higher likelihood; the **log-likelihood margin** is the
mean difference, in nats. Against a reference model (the one before tuning) the DPO
**reward** of a reply is ``beta * (log pi - log ref)``: the reward accuracy and margin
are what ``train --dpo`` optimises, measured on pairs it never saw.

Scoring runs on the model's engine where it has a fast path (the decoder that serves
requests; each pair's two rows share the prompt's KV through the prefix cache), else on
the transformers model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from chatforge.errors import ChatforgeError
from chatforge.training.dpo import DEFAULT_BETA, collate_pairs, completion_logps
from chatforge.training.preference import Pair, PairExample, encode_pairs


@dataclass
class PreferenceScore:
    """One model's scores on held-out pairs."""

    model: str
    pairs: int  # pairs scored
    accuracy: float  # fraction whose chosen reply has the higher log-likelihood
    margin: float  # mean log-lik(chosen) - log-lik(rejected), nats
    reward_accuracy: float | None = None  # against the reference: chosen reward > rejected
    reward_margin: float | None = None  # mean chosen minus rejected reward (beta-scaled)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def pair_logps(loaded: Any, examples: Sequence[PairExample], batch_size: int = 8) -> torch.Tensor:
    """(N, 2) summed log-likelihoods of each pair's chosen and rejected completion."""
    if getattr(loaded, "fast", None) is not None:
        from chatforge.generation.engine import Engine, Request

        requests = []
        for ex in examples:
            for reply, types in zip(
                (ex.chosen, ex.rejected), ex.types or (None, None), strict=True
            ):
                requests.append(
                    Request(
                        ex.prompt + reply, token_type_ids=types, max_new_tokens=0, prompt_logprobs=0
                    )
                )
        scored = Engine.shared(loaded).generate(requests, max_batch=batch_size)
        out = torch.zeros(len(examples), 2, dtype=torch.float64)
        for k, c in enumerate(scored):
            if c.finish_reason == "error" or c.prompt_logprobs is None:
                raise ChatforgeError(f"scoring failed: {c.error}")
            ex = examples[k // 2]
            # Entry t of prompt_logprobs: token t given the ones before it.
            out[k // 2, k % 2] = sum(lp.logprob for lp in c.prompt_logprobs[len(ex.prompt) :])
        return out
    model = loaded.model
    dev = next(model.parameters()).device
    parts = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = {k: v.to(dev) for k, v in collate_pairs(chunk, pad_id=0).items()}
            logps = completion_logps(model, batch).double().cpu()  # (2b,) chosen rows first
            parts.append(torch.stack(logps.chunk(2), dim=1))
    return torch.cat(parts)


def encode_for(loaded: Any, pairs: Sequence[Pair]) -> list[PairExample]:
    """The pairs encoded with ``loaded``'s prompt format; a pair that cannot fit its
    context is an error (held-out pairs must be scored alike by every model)."""
    context = min(loaded.info.context_length, 2048)
    examples, stats = encode_pairs(loaded.format, pairs, context)
    if stats.dropped:
        raise ChatforgeError(
            f"{stats.dropped} of {stats.pairs} pairs do not fit {loaded.info.name}'s context "
            f"of {context} tokens ({stats.drop_reasons[0]})"
        )
    return examples


def summarize(
    name: str,
    logps: torch.Tensor,
    ref: torch.Tensor | None = None,
    beta: float = DEFAULT_BETA,
    seconds: float = 0.0,
) -> PreferenceScore:
    """Scores from (N, 2) pair log-likelihoods (:func:`pair_logps`); with ``ref``, the
    reference model's on the same pairs, the DPO rewards against it too."""
    diff = logps[:, 0] - logps[:, 1]
    score = PreferenceScore(
        model=name,
        pairs=len(logps),
        accuracy=float((diff > 0).double().mean()),
        margin=float(diff.mean()),
        seconds=seconds,
    )
    if ref is not None:
        rewards = beta * (logps - ref)  # (N, 2)
        margins = rewards[:, 0] - rewards[:, 1]
        score.reward_accuracy = float((margins > 0).double().mean())
        score.reward_margin = float(margins.mean())
    return score


def score_models(
    models: Sequence[tuple[str, Any]],
    pairs: Sequence[Pair],
    beta: float = DEFAULT_BETA,
    batch_size: int = 8,
) -> list[PreferenceScore]:
    """Each ``(name, loaded-or-loader)`` model's scores; rewards are against the first.

    A loader (a function returning a loaded model) is called when its turn comes and
    the model dropped after scoring, so only one model is in memory at a time.
    """
    out: list[PreferenceScore] = []
    ref: torch.Tensor | None = None
    for name, model in models:
        t0 = time.perf_counter()
        loaded = model() if callable(model) else model
        logps = pair_logps(loaded, encode_for(loaded, pairs), batch_size)  # (N, 2)
        del loaded
        out.append(summarize(name, logps, ref, beta, time.perf_counter() - t0))
        ref = logps if ref is None else ref
    return out
