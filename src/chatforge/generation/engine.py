"""The generation engine: requests in, streamed text and completions out.

An :class:`Engine` couples a model runner (the forward pass and its KV cache)
with the tokenizer and the stop rules of a loaded model. Each call runs a
:class:`~chatforge.generation.scheduler.Scheduler`: prompts of different
lengths are prefilled together, one token per running sequence is decoded per
step, finished sequences leave the batch and waiting ones join it
(continuous batching). The runner is behind an interface, so a faster model
implementation slots in without touching this code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from chatforge.generation.fast_runner import FastRunner
from chatforge.generation.runner import HFRunner, Runner
from chatforge.generation.scheduler import Scheduler, SchedulerConfig
from chatforge.generation.types import Completion, Request, StreamEvent

__all__ = ["Completion", "Engine", "Request", "StreamEvent"]


class Engine:
    """Generates completions for token prompts.

    >>> engine = Engine.from_loaded(load_model("smollm2"))        # doctest: +SKIP
    >>> engine.generate([Request(ids, GenerationConfig(temperature=0))])  # doctest: +SKIP
    """

    def __init__(
        self,
        runner: Runner | Callable[[], Runner],
        tokenizer: Any,
        stop_token_ids: set[int],
        context_length: int,
        pad_token_id: int = 0,
        scheduler: SchedulerConfig | None = None,
    ) -> None:
        # A runner may hold state (the fast path's KV cache): each scheduler gets its
        # own from the factory, so an abandoned stream never disturbs the next one.
        self.make_runner: Callable[[], Runner] = (
            (lambda: runner) if hasattr(runner, "prefill") else runner  # type: ignore[assignment]
        )
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.scheduler_config = scheduler or SchedulerConfig()

    @classmethod
    def from_loaded(
        cls, loaded: Any, scheduler: SchedulerConfig | None = None, fast: bool | None = None
    ) -> Engine:
        """An engine over a :class:`~chatforge.models.LoadedModel`.

        Uses the model's fast path when it has one (``fast=False`` forces
        transformers' modules, e.g. to compare against them).
        """
        tok = loaded.tokenizer
        stops = set(loaded.format.stop_token_ids())
        eos = loaded.model.generation_config.eos_token_id
        if eos is not None:
            stops |= set(eos if isinstance(eos, list | tuple) else [eos])
        pad = tok.pad_token_id if tok.pad_token_id is not None else (min(stops) if stops else 0)
        decoder = getattr(loaded, "fast", None)
        if fast is True and decoder is None:
            raise ValueError(f"this model has no fast path ({loaded.fast_reason})")
        if decoder is not None and fast is not False:
            runner: Runner | Callable[[], Runner] = functools.partial(FastRunner, decoder)
        else:
            runner = HFRunner(loaded.model)
        return cls(runner, tok, stops, loaded.info.context_length, pad, scheduler)

    def new_scheduler(self, max_batch: int | None = None) -> Scheduler:
        """A scheduler over this engine's runner (the server keeps one running)."""
        cfg = self.scheduler_config
        if max_batch is not None:
            cfg = SchedulerConfig(max_batch=max_batch, prefill_tokens=cfg.prefill_tokens)
        return Scheduler(
            self.make_runner(),
            self.tokenizer,
            self.stop_token_ids,
            self.context_length,
            self.pad_token_id,
            cfg,
        )

    def stream(
        self, requests: Sequence[Request], max_batch: int | None = None
    ) -> Iterator[StreamEvent]:
        """Decode the requests with continuous batching, yielding text as it becomes final.

        Event ``index`` is the request's position in ``requests``. Every request is
        checked against the context before any generation starts.
        """
        sched = self.new_scheduler(max_batch)
        for i, req in enumerate(requests):
            sched.add(req, key=i)
        try:
            while sched.has_work:
                yield from sched.step()
        finally:  # the caller stopped early (Ctrl-C, closed stream): free the batch
            if sched.has_work:
                sched.reset()

    def generate(
        self, requests: Sequence[Request], max_batch: int | None = None
    ) -> list[Completion]:
        """Complete all requests; results in input order."""
        done: dict[Any, Completion] = {}
        for ev in self.stream(requests, max_batch):
            if ev.completion is not None:
                done[ev.index] = ev.completion
        return [done[i] for i in range(len(requests))]
