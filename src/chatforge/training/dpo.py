"""Direct preference optimisation (DPO): the batch, the log-likelihoods, the loss.

The loss is TRL's ``DPOTrainer`` default (``loss_type="sigmoid"``, Rafailov et al.
2023): for a prompt x with a chosen reply y_w and a rejected one y_l,

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x))
                                - (log pi(y_l|x) - log ref(y_l|x))))

where ``pi`` is the model being trained (base + LoRA) and ``ref`` the same weights with
the adapter switched off, so no second copy of the model is held. A batch is laid out
as TRL's ``DataCollatorForPreference`` lays it out (the chosen rows, then the
rejected rows, right-padded, a completion mask), so the same batch gives the same
loss in both (``tests/test_dpo.py`` runs TRL on it).

The log-likelihood of a completion is summed over its tokens from the hidden states,
the LM head applied a chunk of positions at a time (as the SFT loss,
:mod:`~chatforge.training.loss`), so the (2B, T, V) logits never exist at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from chatforge.training.loss import CHUNK, hidden_states, output_head
from chatforge.training.preference import PairExample

DEFAULT_BETA = 0.1
"""TRL's default: how far the trained model may move from the reference."""


def collate_pairs(examples: Sequence[PairExample], pad_id: int) -> dict[str, Tensor]:
    """A batch of B pairs as 2B right-padded rows: ``input_ids``, ``attention_mask`` and
    ``completion_mask`` (2B, T), chosen rows first; ``token_type_ids`` for the sep format."""
    rows = [e.prompt + e.chosen for e in examples] + [e.prompt + e.rejected for e in examples]
    n_prompt = [len(e.prompt) for e in examples] * 2
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, n_prompt, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        comp[i, p : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
    if examples and examples[0].types is not None:
        types = torch.zeros((len(rows), width), dtype=torch.long)
        all_types = [e.types[0] for e in examples] + [e.types[1] for e in examples]
        for i, t in enumerate(all_types):
            types[i, : len(t)] = torch.tensor(t)
        batch["token_type_ids"] = types
    return batch


def _chunk_logps(h: Tensor, t: Tensor, head: Any) -> Tensor:
    # (N, D) hidden, (N,) targets -> (N,) log-probabilities of the targets, fp32.
    return -F.cross_entropy(head(h).float(), t, reduction="none")


def completion_logps(
    model: Any, batch: dict[str, Tensor], head_ok: bool = True, chunk: int = CHUNK
) -> Tensor:
    """(2B,) summed log-probabilities of each row's completion tokens under ``model``.

    Position t predicts token t+1; a token counts when ``completion_mask`` marks it.
    ``head_ok`` (see :func:`~chatforge.training.loss.head_gives_logits`): the logits are
    just the head applied to the hidden states, so only completion positions get them.
    """
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    targets = batch["input_ids"][:, 1:]  # (R, T-1)
    sel = batch["completion_mask"][:, 1:].bool()  # (R, T-1)
    row_of = torch.arange(sel.shape[0], device=sel.device)[:, None].expand_as(sel)[sel]  # (N,)
    if not head_ok:
        logits = model(**inputs).logits[:, :-1]  # (R, T-1, V)
        per_tok = -F.cross_entropy(logits[sel].float(), targets[sel], reduction="none")
    else:
        hidden = hidden_states(model, inputs)[:, :-1]  # (R, T-1, D)
        h, t, head = hidden[sel], targets[sel], output_head(model)  # (N, D), (N,)
        grad = torch.is_grad_enabled()
        parts = []
        for i in range(0, t.numel(), chunk):
            args = (h[i : i + chunk], t[i : i + chunk], head)
            if grad:  # recomputed in backward: one chunk's logits exist at a time
                parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
            else:
                parts.append(_chunk_logps(*args))
        per_tok = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(sel.shape[0], dtype=torch.float32, device=sel.device)
    return out.index_add(0, row_of, per_tok)


@dataclass
class DPOResult:
    """One batch's DPO loss and what it is made of (B pairs)."""

    loss: Tensor  # () mean over the pairs, with gradient
    chosen_rewards: Tensor  # (B,) beta * (log pi - log ref) of the chosen replies, detached
    rejected_rewards: Tensor  # (B,)

    @property
    def margins(self) -> Tensor:
        """(B,) chosen minus rejected reward."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> float:
        """Fraction of pairs whose chosen reply has the higher reward."""
        return float((self.margins > 0).float().mean())


def dpo_loss(policy_logps: Tensor, ref_logps: Tensor, beta: float = DEFAULT_BETA) -> DPOResult:
    """The sigmoid DPO loss from (2B,) completion log-likelihoods, chosen rows first."""
    pc, pr = policy_logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    chosen, rejected = pc - rc, pr - rr  # log-ratios, (B,)
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return DPOResult(loss, beta * chosen.detach(), beta * rejected.detach())


@contextmanager
def adapter_off(model: Any):
    """The reference model: ``model`` with its LoRA adapter switched off (peft), no grad."""
    from chatforge.training.model import unwrap

    bare = unwrap(model)
    off = bare.disable_adapter() if hasattr(bare, "disable_adapter") else nullcontext()
    with torch.no_grad(), off:
        yield


def reference_logps(model: Any, batch: dict[str, Tensor], head_ok: bool = True) -> Tensor:
    """(2B,) completion log-likelihoods under the reference (the adapter switched off)."""
    with adapter_off(model):
        return completion_logps(model, batch, head_ok)


def batch_loss(
    model: Any, batch: dict[str, Tensor], beta: float = DEFAULT_BETA, head_ok: bool = True
) -> DPOResult:
    """The DPO loss of one batch: a reference forward (no grad) and a policy forward."""
    ref = reference_logps(model, batch, head_ok)
    return dpo_loss(completion_logps(model, batch, head_ok), ref, beta)
