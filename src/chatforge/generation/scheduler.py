"""Continuous batching: a waiting queue, a running batch, one token per step.

Each :meth:`Scheduler.step` decodes one token for every running sequence,
then admits waiting requests (prefilled together, within a prompt-token
budget) which join the running batch; finished sequences leave it at once, so
a short reply never waits for a long one and a new request never waits for
the batch to drain. The engine's ``generate``/``stream`` and the HTTP server
both drive this class.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chatforge.generation.runner import Runner
from chatforge.generation.sampling import SamplingParams, make_generator, sample
from chatforge.generation.stream import TextStream
from chatforge.generation.types import Completion, Request, StreamEvent


@dataclass
class SchedulerConfig:
    """Limits of one scheduler."""

    max_batch: int = 32
    """Most sequences decoded together; more requests wait for a free place."""
    prefill_tokens: int = 2048
    """Prompt tokens prefilled in one step (one prompt is always admitted, however long)."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {self.max_batch})")
        if self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1 (got {self.prefill_tokens})")


class Sequence:
    """Book-keeping for one request while it is waiting or running."""

    def __init__(self, key: Hashable, req: Request, budget: int, tokenizer: Any) -> None:
        self.key = key
        self.req = req
        self.budget = budget  # reply tokens allowed
        self.stream = TextStream(tokenizer, req.config.stop)
        self.generator = None if req.config.greedy else make_generator(req.config.seed)
        self.history: list[int] = list(req.prompt_ids)  # prompt + reply, for penalties
        self.generated: list[int] = []
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.added_at = time.perf_counter()
        self.first_token_at: float | None = None


class Scheduler:
    """Runs requests to completion with continuous batching over a :class:`Runner`."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        stop_token_ids: set[int],
        context_length: int,
        pad_token_id: int = 0,
        config: SchedulerConfig | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.config = config or SchedulerConfig()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # row i of the runner state is running[i]
        self.state: Any = None
        self._keys = itertools.count()

    # -- queue -------------------------------------------------------------------

    def budget_for(self, req: Request) -> int:
        """Reply tokens allowed for ``req``; raises ContextOverflowError when none fit."""
        n = len(req.prompt_ids)
        if n < 1:
            raise ValueError("a prompt must have at least one token")
        budget = req.config.reply_budget(n, self.context_length)
        if req.max_new_tokens is not None:
            budget = min(budget, req.max_new_tokens)
        return budget

    def add(self, req: Request, key: Hashable | None = None) -> Hashable:
        """Queue a request; returns the key its events carry. Validates the budget now."""
        key = next(self._keys) if key is None else key
        self.waiting.append(Sequence(key, req, self.budget_for(req), self.tokenizer))
        return key

    def cancel(self, key: Hashable) -> bool:
        """Drop a waiting or running request (a client went away); True if it was found."""
        for seq in list(self.waiting):
            if seq.key == key:
                self.waiting.remove(seq)
                return True
        for row, seq in enumerate(self.running):
            if seq.key == key:
                self._remove_rows([row])
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- stepping ------------------------------------------------------------------

    def step(self) -> list[StreamEvent]:
        """Decode one token for the running batch, then admit waiting requests."""
        events: list[StreamEvent] = []
        if self.running:
            tokens = torch.tensor([s.next_token for s in self.running], dtype=torch.long)
            logits = self.runner.decode(self.state, tokens, self._reply_types(self.running))
            finished = self._accept(self.running, logits, events)
            self._remove_rows(finished)
        admitted = self._admit()
        if admitted:
            logits, state = self._prefill(admitted)
            finished = self._accept(admitted, logits, events)
            keep = [i for i in range(len(admitted)) if i not in set(finished)]
            if len(keep) < len(admitted):  # also frees what the runner holds for them
                state = self.runner.select(state, torch.tensor(keep, dtype=torch.long))
            if keep:
                survivors = [admitted[i] for i in keep]
                if self.running:
                    self.state = self.runner.merge(self.state, state)
                    self.running.extend(survivors)
                else:
                    self.state, self.running = state, survivors
        return events

    def _admit(self) -> list[Sequence]:
        out: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(out) < self.config.max_batch:
            n = len(self.waiting[0].req.prompt_ids)
            if out and tokens + n > self.config.prefill_tokens:
                break
            out.append(self.waiting.popleft())
            tokens += n
        return out

    def _prefill(self, seqs: list[Sequence]) -> tuple[Tensor, Any]:
        lengths = [len(s.req.prompt_ids) for s in seqs]
        t, b = max(lengths), len(seqs)
        ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((b, t), dtype=torch.long)
        has_types = any(s.req.token_type_ids is not None for s in seqs)
        types = torch.zeros((b, t), dtype=torch.long) if has_types else None
        for i, s in enumerate(seqs):
            n = lengths[i]
            ids[i, t - n :] = torch.tensor(s.req.prompt_ids, dtype=torch.long)
            mask[i, t - n :] = 1
            if types is not None and s.req.token_type_ids is not None:
                types[i, t - n :] = torch.tensor(s.req.token_type_ids, dtype=torch.long)
        return self.runner.prefill(ids, mask, types)

    def _accept(self, seqs: list[Sequence], logits: Tensor, events: list[StreamEvent]) -> list[int]:
        """Sample a token per row of ``logits`` (B, V); return the rows that finished."""
        params = SamplingParams.from_configs([s.req.config for s in seqs])
        tokens = sample(
            logits, params, [s.generator for s in seqs], histories=[s.history for s in seqs]
        ).tolist()
        now = time.perf_counter()
        finished: list[int] = []
        for row, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.first_token_at is None:
                seq.first_token_at = now
            reason, text = None, ""
            if tok in self.stop_token_ids:
                reason = "stop"
            else:
                seq.generated.append(tok)
                seq.history.append(tok)
                text = seq.stream.push(tok)
                if seq.stream.stopped:
                    reason = "stop"
                elif len(seq.generated) >= seq.budget:
                    reason = "length"
            if reason is None:
                seq.next_token = tok
                if text:
                    events.append(StreamEvent(seq.key, text))
                continue
            text += seq.stream.flush()  # the last piece goes out with the completion
            events.append(StreamEvent(seq.key, text, self._complete(seq, reason, now)))
            finished.append(row)
        return finished

    def _remove_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self.running)) if i not in gone]
        self.running = [self.running[i] for i in keep]
        self.state = self.runner.select(self.state, torch.tensor(keep, dtype=torch.long))
        if not keep:
            self.state = None

    def reset(self) -> list[Sequence]:
        """Drop every request (after a failed step); returns them so callers can report."""
        dropped = [*self.running, *self.waiting]
        if self.running:
            self._remove_rows(list(range(len(self.running))))
        self.waiting.clear()
        return dropped

    @staticmethod
    def _reply_types(seqs: list[Sequence]) -> Tensor | None:
        if all(s.req.reply_token_type is None for s in seqs):
            return None
        return torch.tensor([s.req.reply_token_type or 0 for s in seqs], dtype=torch.long)

    @staticmethod
    def _complete(seq: Sequence, reason: str, now: float) -> Completion:
        return Completion(
            text=seq.stream.text,
            token_ids=list(seq.generated),
            finish_reason=reason,
            prompt_tokens=len(seq.req.prompt_ids),
            completion_tokens=len(seq.generated),
            seconds=now - seq.added_at,
            first_token_seconds=(
                None if seq.first_token_at is None else seq.first_token_at - seq.added_at
            ),
        )
