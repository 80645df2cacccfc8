"""The generation engine: prefill, decode step by step, stream, stop.

One call decodes a batch of requests of different lengths together. Per step
the engine samples one token per active row (sampling settings are per row),
feeds each row's token through its :class:`~chatforge.generation.stream.TextStream`
(detokenisation + stop-string holdback), and drops finished rows from the
batch so they cost nothing more. The model forward lives behind a
:class:`~chatforge.generation.runner.Runner`, so a faster runner can be
swapped in without touching this loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from chatforge.generation.config import GenerationConfig
from chatforge.generation.runner import HFRunner, Runner
from chatforge.generation.sampling import SamplingParams, make_generator, sample
from chatforge.generation.stream import TextStream


@dataclass
class Request:
    """One prompt to complete."""

    prompt_ids: list[int]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    token_type_ids: list[int] | None = None  # sep format only
    reply_token_type: int | None = None  # token type of generated tokens (sep format)
    max_new_tokens: int | None = None  # resolved reply budget; None: from config + context


@dataclass
class Completion:
    """The result of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, separator or stop string) | "length" | "interrupted"
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # from the start of the batch to this request's end
    first_token_seconds: float | None = None  # time to first token

    def to_dict(self) -> dict:
        return {
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 4),
            "first_token_seconds": (
                None if self.first_token_seconds is None else round(self.first_token_seconds, 4)
            ),
        }


@dataclass
class StreamEvent:
    """Newly final text of request ``index``; ``completion`` is set on its last event."""

    index: int
    text: str
    completion: Completion | None = None


class _Seq:
    """Book-keeping for one active request."""

    def __init__(self, index: int, req: Request, budget: int, tokenizer: Any) -> None:
        self.index = index
        self.req = req
        self.budget = budget
        self.stream = TextStream(tokenizer, req.config.stop)
        self.generator = None if req.config.greedy else make_generator(req.config.seed)
        self.history: list[int] = list(req.prompt_ids)  # prompt + generated, for n-gram bans
        self.generated: list[int] = []
        self.first_token_at: float | None = None


class Engine:
    """Generates completions for token prompts with a model runner.

    >>> engine = Engine.from_loaded(load_model("smollm2"))        # doctest: +SKIP
    >>> engine.generate([Request(ids, GenerationConfig(temperature=0))])  # doctest: +SKIP
    """

    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        stop_token_ids: set[int],
        context_length: int,
        pad_token_id: int = 0,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.context_length = context_length
        self.pad_token_id = pad_token_id

    @classmethod
    def from_loaded(cls, loaded: Any) -> Engine:
        """An engine over a :class:`~chatforge.models.LoadedModel` with the HF runner."""
        tok = loaded.tokenizer
        stops = set(loaded.format.stop_token_ids())
        eos = loaded.model.generation_config.eos_token_id
        if eos is not None:
            stops |= set(eos if isinstance(eos, list | tuple) else [eos])
        pad = tok.pad_token_id if tok.pad_token_id is not None else (min(stops) if stops else 0)
        return cls(HFRunner(loaded.model), tok, stops, loaded.info.context_length, pad)

    # -- public API ------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Complete all requests (decoded together); results in input order."""
        done: dict[int, Completion] = {}
        for ev in self.stream(requests):
            if ev.completion is not None:
                done[ev.index] = ev.completion
        return [done[i] for i in range(len(requests))]

    def stream(self, requests: Sequence[Request]) -> Iterator[StreamEvent]:
        """Decode the requests together, yielding text as it becomes final."""
        if not requests:
            return
        t0 = time.perf_counter()
        seqs = [_Seq(i, r, self._budget(r), self.tokenizer) for i, r in enumerate(requests)]
        logits, state = self._prefill(seqs)
        active = list(seqs)
        params = SamplingParams.from_configs([s.req.config for s in active])
        history, history_mask = self._history_tensors(active)
        while active:
            tokens = self._sample(logits, active, params, history, history_mask)
            keep: list[int] = []
            now = time.perf_counter()
            for row, seq in enumerate(active):
                tok = int(tokens[row])
                if seq.first_token_at is None:
                    seq.first_token_at = now - t0
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
                    if text:
                        yield StreamEvent(seq.index, text)
                    keep.append(row)
                    continue
                # The last piece of text goes out with the completion.
                text += seq.stream.flush()
                yield StreamEvent(seq.index, text, self._complete(seq, reason, t0))
            if not keep:
                break
            if len(keep) < len(active):
                rows = torch.tensor(keep, dtype=torch.long)
                state = self.runner.select(state, rows)
                params = params.select(rows)
                if history is not None:
                    history, history_mask = history[rows], history_mask[rows]
                tokens = tokens[rows]
                active = [active[i] for i in keep]
            if history is not None:
                history, history_mask = self._append_history(history, history_mask, tokens)
            types = self._reply_types(active)
            logits = self.runner.decode(state, tokens, types)

    # -- internals ---------------------------------------------------------------

    def _budget(self, req: Request) -> int:
        if req.max_new_tokens is not None:
            budget = min(req.max_new_tokens, self.context_length - len(req.prompt_ids))
            if budget < 1:
                req.config.reply_budget(len(req.prompt_ids), self.context_length)  # raises
            return budget
        return req.config.reply_budget(len(req.prompt_ids), self.context_length)

    def _prefill(self, seqs: list[_Seq]) -> tuple[Tensor, Any]:
        lengths = [len(s.req.prompt_ids) for s in seqs]
        if min(lengths) < 1:
            raise ValueError("a prompt must have at least one token")
        t = max(lengths)
        b = len(seqs)
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
        if isinstance(self.runner, HFRunner):
            self.runner.capacity_hint = max(s.budget for s in seqs)
        return self.runner.prefill(ids, mask, types)

    def _history_tensors(self, seqs: list[_Seq]) -> tuple[Tensor | None, Tensor | None]:
        """Prompt tokens as (B, T) ids + mask, only when some row has a repetition penalty."""
        if all(s.req.config.repetition_penalty == 1.0 for s in seqs):
            return None, None
        t = max(len(s.req.prompt_ids) for s in seqs)
        hist = torch.zeros((len(seqs), t), dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.bool)
        for i, s in enumerate(seqs):
            n = len(s.req.prompt_ids)
            hist[i, t - n :] = torch.tensor(s.req.prompt_ids)
            mask[i, t - n :] = True
        return hist, mask

    @staticmethod
    def _append_history(hist: Tensor, mask: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        # Small (B, L) tensors; a cat per step is cheap next to the model forward.
        hist = torch.cat([hist, tokens.view(-1, 1).to(hist.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=torch.bool)], dim=1)
        return hist, mask

    def _sample(
        self,
        logits: Tensor,
        seqs: list[_Seq],
        params: SamplingParams,
        history: Tensor | None,
        history_mask: Tensor | None,
    ) -> Tensor:
        histories = [s.history for s in seqs]
        return sample(
            logits,
            params,
            [s.generator for s in seqs],
            history=history,
            history_mask=history_mask,
            histories=histories,
        )

    @staticmethod
    def _reply_types(seqs: list[_Seq]) -> Tensor | None:
        if all(s.req.reply_token_type is None for s in seqs):
            return None
        return torch.tensor([s.req.reply_token_type or 0 for s in seqs], dtype=torch.long)

    @staticmethod
    def _complete(seq: _Seq, reason: str, t0: float) -> Completion:
        return Completion(
            text=seq.stream.text,
            token_ids=list(seq.generated),
            finish_reason=reason,
            prompt_tokens=len(seq.req.prompt_ids),
            completion_tokens=len(seq.generated),
            seconds=time.perf_counter() - t0,
            first_token_seconds=seq.first_token_at,
        )
