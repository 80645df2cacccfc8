"""The generation engine: one per loaded model, alive as long as the model.

``add(request) -> handle``, ``step() -> events``, ``abort(handle)`` (the shape
of nano-vllm's engine). A step is three pieces with one concern each:

1. the :class:`~chatforge.generation.scheduler.Scheduler` picks which
   sequences run and how many tokens each feeds (admission, chunked prefill,
   preemption), taking prompt prefixes from the prefix cache;
2. the model runner builds tensors from those sequences and runs one forward
   pass over the paged KV cache;
3. post-processing (:mod:`~chatforge.generation.postprocess`) reads logprobs,
   applies the requests' logits processors, samples, applies stop rules and
   detokenises.

A request is checked before it is queued (:mod:`~chatforge.generation.validate`,
which also resolves its reply budget).

**Sliding past the context** (``GenerationConfig.slide``): when a sequence's next token
would not fit in the context, its window becomes its head (``keep`` tokens) and the
newest half of the rest (:func:`slide_drop`, llama.cpp's context-shift amount); its KV
blocks go back and the scheduler computes the new window again from scratch, the head's
full blocks from the prefix cache. Positions restart at 0 for the window, so the next
token's logits are those of a fresh forward pass over it (exact, not a shifted cache);
a window of ``C`` tokens costs one prefill every ``(C - keep) / 2`` tokens. Penalties
still see the whole prompt and reply (``Sequence.history``).

The KV of finished requests stays in the cache (block-granular, LRU, within
``kv_cache_mb``), so the next turn of a chat, a repeated system prompt or
``n`` samples of one prompt start where the cache ends. A failure while
admitting, running or sampling one request ends that request only (its
completion has ``finish_reason="error"``); the others go on.

Chat sessions, batch generation, evaluation, the server and the benchmarks
all drive this class; nothing else runs a scheduler. An engine may be shared
by several threads (each call takes a lock); events reach each request's own
callback or buffer, whoever called :meth:`step`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from chatforge.errors import ChatforgeError, ParamError
from chatforge.generation.fast_runner import FastRunner
from chatforge.generation.grammar import config_processors
from chatforge.generation.kv import BlockManager, block_hashes
from chatforge.generation.postprocess import Events, PostProcessor
from chatforge.generation.runner import HFRunner, ModelRunner, Work
from chatforge.generation.scheduler import Scheduler, SchedulerConfig
from chatforge.generation.sequence import Sequence as Seq
from chatforge.generation.sequence import Status
from chatforge.generation.types import Completion, Request, StreamEvent, TokenLogprob
from chatforge.generation.validate import check_request
from chatforge.models.fast.lora import AdapterError, load_adapter
from chatforge.threads import ThreadPolicy

__all__ = ["Completion", "Engine", "EngineConfig", "Request", "StreamEvent", "TokenLogprob"]

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Limits of one engine."""

    max_batch: int = 32
    """Most sequences running together; more requests wait for a place."""
    prefill_tokens: int = 2048
    """Prompt tokens fed per step; a longer prompt is prefilled in chunks across steps."""
    kv_cache_mb: int = 2048
    """Memory for the KV cache, running sequences and the prefix cache together.
    It is taken as needed; past it, cached prefixes are evicted (least recently used
    first), then the newest sequences wait (preemption)."""
    prefix_cache: bool = True
    """Reuse the KV of earlier requests whose tokens a new prompt starts with."""
    threads: int | None = None
    """Threads for the forward pass; None: as many cores as other processes leave free
    (re-checked every half second)."""
    device: str | None = None
    """Where the model must run (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``); None:
    wherever it was loaded. The device is chosen when the model loads
    (``load_model(ref, device=...)``, which places the weights there); this checks that
    the model is there, so an engine never runs somewhere else than asked."""

    def __post_init__(self) -> None:
        SchedulerConfig(self.max_batch, self.prefill_tokens)  # validates both
        if self.device is not None:
            from chatforge.device import DeviceError, check_device_spec

            try:
                check_device_spec(self.device)
            except DeviceError as e:  # a config's error names its field
                raise ValueError(str(e).replace("--device", "device", 1)) from None
        if self.kv_cache_mb < 1:
            raise ValueError(f"kv_cache_mb must be >= 1 (got {self.kv_cache_mb})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None (got {self.threads})")


def _check_device(spec: str, have: Any) -> None:
    """``EngineConfig.device`` against the device the model is on (``have``)."""
    from chatforge.device import resolve_device

    want = resolve_device(spec)
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise ValueError(
            f"EngineConfig(device={spec!r}) but the model is loaded on {have}; load it there: "
            f"load_model(ref, device={spec!r})"
        )


def slide_drop(window: int, keep: int, context_length: int) -> int:
    """Tokens a slide drops from a ``window``-token sequence (one more than the context
    holds) after its ``keep``-token head: the window keeps the head and the newest half
    (rounded up) of the ``context_length - keep`` tokens after it, so the next slide is
    that half later."""
    tail = (context_length - keep + 1) // 2  # >= 1: keep < context_length
    return window - keep - tail


@dataclass
class Prepared:
    """A request validated by :meth:`Engine.prepare`: its reply budget and its
    processors bound to one sequence (so it serves one :meth:`Engine.add`)."""

    budget: int
    processors: list[Any]
    keep: int = 0
    """A sliding reply's head (``GenerationConfig.keep``, else ``Request.keep_tokens``)."""
    context_capped: bool = False
    """The context, not the request's lengths, limits ``budget`` (``Completion.context_full``)."""


class Engine:
    """Generates completions for token prompts; see the module docstring.

    >>> engine = Engine.shared(load_model("smollm2"))                    # doctest: +SKIP
    >>> engine.generate([Request(ids, GenerationConfig(temperature=0))])  # doctest: +SKIP
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        stop_token_ids: set[int],
        context_length: int,
        vocab_size: int,
        config: EngineConfig | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.config = config or EngineConfig()
        blocks = None
        if runner.block_size is not None:
            per_block = max(1, runner.bytes_per_block())
            max_blocks = max(1, self.config.kv_cache_mb * 2**20 // per_block)
            blocks = BlockManager(runner.block_size, max_blocks)
        self.blocks = blocks
        self.scheduler = Scheduler(
            SchedulerConfig(self.config.max_batch, self.config.prefill_tokens),
            blocks,
            prefix_cache=self.config.prefix_cache,
        )
        self.post = PostProcessor(runner, retire=self._retire)
        self._seqs: dict[int, Seq] = {}  # live requests by handle
        self._done: dict[int, Seq] = {}  # finished, buffered events not yet read
        self._next_id = 0
        self._lock = threading.RLock()
        self.threads = ThreadPolicy(self.config.threads)

    @classmethod
    def from_loaded(
        cls, loaded: Any, config: EngineConfig | None = None, fast: bool | None = None
    ) -> Engine:
        """A new engine over a :class:`~chatforge.models.LoadedModel`.

        Uses the model's fast path when it has one (``fast=False`` forces
        transformers' modules, e.g. to compare against them). Most callers want
        :meth:`shared`, the model's one engine (its prefix cache is shared too).
        """
        tok = loaded.tokenizer
        stops = set(loaded.format.stop_token_ids())
        eos = loaded.eos_token_id
        if eos is not None:
            stops |= set(eos if isinstance(eos, list | tuple) else [eos])
        decoder = getattr(loaded, "fast", None)
        if fast is True and decoder is None:
            raise ValueError(f"this model has no fast path ({loaded.fast_reason})")
        if decoder is not None and fast is not False:
            runner: ModelRunner = FastRunner(decoder)
            vocab = decoder.cfg.vocab_size
        else:
            runner = HFRunner(loaded.model)
            vocab = loaded.model.config.vocab_size
        if config is not None and config.device is not None:
            _check_device(config.device, runner.device)
        return cls(runner, tok, stops, loaded.info.context_length, vocab, config)

    @property
    def device(self) -> Any:
        """The ``torch.device`` the model runs on (its KV cache and logits are there)."""
        import torch

        return getattr(self.runner, "device", torch.device("cpu"))

    @classmethod
    def shared(cls, loaded: Any, config: EngineConfig | None = None) -> Engine:
        """The model's own engine, made on first use (chat, batch, eval and serve share it).

        ``config`` applies when this call makes it.
        """
        engine = getattr(loaded, "engine", None)
        if engine is None:
            engine = loaded.engine = cls.from_loaded(loaded, config)
        return engine

    # -- requests -----------------------------------------------------------------------

    def budget_for(self, req: Request) -> int:
        """Reply tokens allowed for ``req`` (validating it); raises ContextOverflowError
        when the prompt leaves no room, ValueError for anything else out of range."""
        return self.prepare(req).budget

    def prepare(self, req: Request) -> Prepared:
        """Validate ``req`` (as :meth:`budget_for`) and bind its logits processors to a
        new sequence: pass the result to :meth:`add` (``prepared=``, once) so a caller
        that validates in its own thread does not do the work twice (a grammar's parser
        is built here)."""
        bm = self.blocks
        budget = check_request(
            req,
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            adapters=self.adapters,
            kv_tokens=None if bm is None else bm.max_blocks * bm.block_size,
            kv_cache_mb=self.config.kv_cache_mb,
        )
        processors = [p.bind(self) for p in [*req.processors, *config_processors(req.config)]]
        for proc in processors:
            proc.validate(self.vocab_size)
        n, cap = len(req.prompt_ids), req.max_new_tokens
        return Prepared(
            budget,
            processors,
            keep=self._keep(req),
            context_capped=req.config.context_caps_reply(n, self.context_length, cap),
        )

    def _keep(self, req: Request) -> int:
        """The head a sliding reply never drops: ``config.keep`` (< the context, else a
        ParamError), else the request's ``keep_tokens`` (its system prompt), at most half
        the context."""
        keep = req.config.keep
        if keep is not None:
            if keep >= self.context_length:
                raise ParamError(
                    "keep",
                    f"must be less than the model's context ({self.context_length} tokens; "
                    f"got {keep}): the window needs room for the newest tokens",
                )
            return keep
        return min(req.keep_tokens or 0, self.context_length // 2)

    def add(
        self,
        request: Request,
        on_event: Callable[[StreamEvent], None] | None = None,
        prepared: Prepared | None = None,
    ) -> int:
        """Queue a request; returns its handle. Validates it now (ValueError /
        ContextOverflowError) unless ``prepared`` (:meth:`prepare` of this request)
        is given. Its events go to ``on_event`` (called on the thread that runs
        :meth:`step`) or, without one, are kept for :meth:`events`."""
        if prepared is None:
            prepared = self.prepare(request)
        with self._lock:
            salt = b""
            if request.adapter is not None:  # checked again: it may have been unloaded since
                adapter = next((a for a in self.runner.adapters if a.name == request.adapter), None)
                if adapter is None:
                    raise ValueError(f"the LoRA adapter {request.adapter!r} is not loaded")
                salt = adapter.key
            handle = self._next_id
            self._next_id += 1
            seq = Seq(handle, request, prepared.budget, self.tokenizer, on_event)
            seq.processors = prepared.processors
            seq.keep, seq.context_capped = prepared.keep, prepared.context_capped
            seq.salt = salt
            if request.prompt_logprobs is not None:
                seq.prompt_logprobs.append(None)  # the first token has no context
            self._seqs[handle] = seq
            self.scheduler.add(seq)
        return handle

    def abort(self, handle: int) -> bool:
        """Stop a request (waiting or running) and free its place; True if it was live."""
        with self._lock:
            seq = self._seqs.pop(handle, None)
            if seq is None:
                return False
            self.scheduler.remove(seq)
            self.runner.release(seq)
            return True

    def events(self, handle: int) -> list[StreamEvent]:
        """Events of a request added without ``on_event``, since the last call."""
        with self._lock:
            seq = self._seqs.get(handle) or self._done.pop(handle, None)
            if seq is None:
                return []
            out = list(seq.buffer)
            seq.buffer.clear()
            return out

    # -- LoRA adapters ------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters requests may name (``Request.adapter``)."""
        return [a.name for a in getattr(self.runner, "adapters", ())]

    def add_adapter(self, directory: str | Path, name: str | None = None) -> str:
        """Load a LoRA adapter directory so requests can name it; returns its name.

        It is applied per request without merging (a batch may mix adapters and the
        base). Replacing a loaded adapter of the same name waits for no one: it is
        refused while requests use it. Needs the fast path.
        """
        decoder = getattr(self.runner, "model", None)
        if not hasattr(decoder, "add_adapter"):
            raise AdapterError(
                "LoRA adapters per request need chatforge's fast path, which this model "
                "does not run; load the adapter directory as a model instead (merged)"
            )
        adapter = load_adapter(directory, decoder, name)  # slow part: outside the lock
        adapter.key = f"lora:{adapter.name}:".encode() + os.urandom(8)
        with self._lock:
            self._refuse_in_use(adapter.name, "replaced")
            decoder.add_adapter(adapter)
        return adapter.name

    def remove_adapter(self, name: str) -> bool:
        """Unload adapter ``name`` (refused while requests use it); True if it was loaded."""
        with self._lock:
            if name not in self.adapters:
                return False
            self._refuse_in_use(name, "unloaded")
            return self.runner.model.remove_adapter(name)

    def _refuse_in_use(self, name: str, what: str) -> None:
        users = sum(1 for s in self._seqs.values() if s.request.adapter == name)
        if users:
            raise AdapterError(
                f"the LoRA adapter {name!r} cannot be {what}: {users} request(s) use it now"
            )

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def occupancy(self) -> tuple[int, int]:
        """(running, waiting) sequence counts."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

    def cache_stats(self) -> dict[str, int]:
        """Prefix-cache counters: prompt tokens looked up and served from the cache."""
        bm = self.blocks
        if bm is None:
            return {"lookup_tokens": 0, "hit_tokens": 0, "blocks": 0, "blocks_used": 0}
        return {
            "lookup_tokens": bm.lookups,
            "hit_tokens": bm.hits,
            "blocks": bm.n_blocks,
            "blocks_used": bm.used,
        }

    # -- one step -----------------------------------------------------------------------

    def step(self, max_batch: int | None = None) -> list[StreamEvent]:
        """Run one step for every scheduled sequence; returns the events it produced.

        ``max_batch`` lowers the number of running sequences for this step (a service's
        own limit); None: the engine's ``max_batch``.
        """
        cap = self.config.max_batch
        limit = cap if max_batch is None else min(max_batch, cap)
        with self._lock:
            self.threads.apply()  # the thread count for this step (cheap; measures twice a second)
            scheduled = self.scheduler.schedule(limit)
            if not scheduled:
                return []
            events: Events = []  # this step's, in order, with their sequences
            work = [Work.feed(seq, n) for seq, n in scheduled]
            features = self._run(work, events)
            self.post.process(work, features, events, self.stop_token_ids)
            for w in work:  # a sliding sequence whose next token would not fit
                seq = w.seq
                if seq.status is Status.RUNNING and len(seq.tokens) > self.context_length:
                    assert seq.request.config.slide, "the reply budget keeps it in the context"
                    self._slide(seq)
            return self._dispatch(events)

    def _slide(self, seq: Seq) -> None:
        """Drop the oldest tokens of ``seq``'s window after its head and have the new
        window computed from scratch (see the module docstring)."""
        seq.slide(slide_drop(len(seq.tokens), seq.keep, self.context_length))
        self.scheduler.recompute(seq)  # its KV was of the old positions
        self.runner.release(seq)

    def _run(self, work: list[Work], events: Events) -> list[Tensor | None]:
        """The forward pass; then what it computed joins the KV cache's books."""
        if self.blocks is not None:
            self.runner.ensure_blocks(self.blocks.n_blocks)
        features = self._forward(work, events)
        for w in work:
            if w.seq.status is Status.RUNNING:  # its pass did not fail
                w.seq.num_computed = w.end
                self._offer_blocks(w.seq)
        return features

    def _forward(self, work: list[Work], events: Events) -> list[Tensor | None]:
        """The runner's pass; when it fails, each sequence alone, failing only the culprits."""
        try:
            return self.runner.run(work)
        except Exception as e:  # noqa: BLE001
            if len(work) == 1:
                self.post.fail(work[0].seq, e, events)
                return [None]
        out: list[Tensor | None] = []
        for w in work:  # rows are computed alone the same way: a retry changes nothing
            try:
                out.append(self.runner.run([w])[0])
            except Exception as e:  # noqa: BLE001
                self.post.fail(w.seq, e, events)
                out.append(None)
        return out

    def _offer_blocks(self, seq: Seq) -> None:
        """Register ``seq``'s newly filled blocks with the prefix cache."""
        bm = self.blocks
        if bm is None:
            return
        full = seq.num_computed // bm.block_size
        if full <= seq.registered:
            return
        seq.block_hashes = block_hashes(
            seq.tokens, seq.types, bm.block_size, full, seq.block_hashes, seq.salt
        )
        for b in range(seq.registered, full):
            bm.register(seq.block_table[b], seq.block_hashes[b])
        seq.registered = full

    def _retire(self, seq: Seq) -> None:
        """A finished sequence (its completion in this step's events) leaves the engine."""
        self.scheduler.remove(seq)
        self.runner.release(seq)
        self._seqs.pop(seq.id, None)
        if seq.on_event is None:
            self._done[seq.id] = seq  # its buffer is read after it finished

    def _dispatch(self, events: Events) -> list[StreamEvent]:
        """Each event to its request's callback, or its buffer; returns the events."""
        for seq, ev in events:
            if seq.on_event is None:
                seq.buffer.append(ev)
                continue
            try:
                seq.on_event(ev)
            except Exception:  # noqa: BLE001 - a listener's fault is not the engine's
                log.exception("event listener of request %s failed", seq.id)
        return [ev for _, ev in events]

    # -- conveniences -------------------------------------------------------------------

    def stream(
        self, requests: Sequence[Request], max_batch: int | None = None
    ) -> Iterator[StreamEvent]:
        """Decode the requests, yielding text as it becomes final.

        Event ``index`` is the request's position in ``requests``. Every request is
        validated before any generation starts. ``max_batch`` caps how many of these
        requests run at once. Stopping early (closing the iterator) aborts the rest.
        """
        for req in requests:
            self.budget_for(req)
        limit = max_batch or len(requests)
        inbox: deque[StreamEvent] = deque()
        index: dict[int, int] = {}
        next_req = 0
        live: set[int] = set()
        try:
            while next_req < len(requests) or live:
                while next_req < len(requests) and len(live) < limit:
                    h = self.add(requests[next_req], on_event=inbox.append)
                    index[h] = next_req
                    live.add(h)
                    next_req += 1
                if not inbox:
                    self.step()
                while inbox:
                    ev = inbox.popleft()
                    if ev.completion is not None:
                        live.discard(ev.index)
                    yield StreamEvent(index[ev.index], ev.text, ev.completion, ev.tokens)
        finally:  # the caller stopped early (Ctrl-C, closed stream): free their places
            for h in live:
                self.abort(h)

    def generate(
        self, requests: Sequence[Request], max_batch: int | None = None
    ) -> list[Completion]:
        """Complete all requests; results in input order (a failed one has
        ``finish_reason="error"`` and its ``error``)."""
        done: dict[int, Completion] = {}
        for ev in self.stream(requests, max_batch):
            if ev.completion is not None:
                done[ev.index] = ev.completion
        return [done[i] for i in range(len(requests))]

    def score(self, prompt_ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """The logprob of every prompt token given the ones before it, from one prefill
        (the first token has none); ``top`` alternatives per position (0..20).

        Logprobs are of the model's own distribution (no temperature or filters).
        """
        req = Request(list(prompt_ids), max_new_tokens=0, prompt_logprobs=top)
        (c,) = self.generate([req])
        if c.finish_reason == "error":
            raise ChatforgeError(f"scoring failed: {c.error}")
        assert c.prompt_logprobs is not None
        return c.prompt_logprobs

    def embed(self, token_lists: Sequence[Sequence[int]]) -> list[list[float]]:
        """One embedding per prompt: the mean of its tokens' final hidden states (after
        the final norm, transformers' ``last_hidden_state``), L2-normalised.

        The prompts are batched with each other (and whatever else the engine runs);
        each is computed whole, without the prefix cache. Raises ContextOverflowError
        for a prompt longer than the context, ChatforgeError if computing one fails.
        """
        reqs = [Request(list(ids), max_new_tokens=0, embed=True) for ids in token_lists]
        out: list[list[float]] = []
        for c in self.generate(reqs):
            if c.finish_reason == "error" or c.embedding is None:
                raise ChatforgeError(f"embedding failed: {c.error}")
            out.append(c.embedding)
        return out
