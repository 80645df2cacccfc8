"""One request's state inside the engine, from queued to finished."""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatforge.generation.sampling import make_generator
from chatforge.generation.stream import TextStream
from chatforge.generation.types import Request, StreamEvent, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted (its KV given back; recomputed when readmitted)
    RUNNING = "running"  # holds KV blocks; fed tokens every step until finished
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request being served: its tokens so far and where its KV lives.

    ``tokens`` is the prompt then the generated tokens; the first ``num_computed``
    of them are in the KV cache. A step feeds ``tokens[num_computed:]`` (or a
    chunk of it): a whole prompt, the rest of a prompt whose start came from the
    prefix cache, or the one token sampled last step; all are the same operation.

    ``tokens`` is the *window* the model sees (positions ``0..len-1``). It is the whole
    prompt and reply until a sliding request (``GenerationConfig.slide``) outgrows the
    context; :meth:`slide` then drops its oldest tokens after the first ``keep``, and
    the whole prompt and reply stay in :attr:`history` (``generated`` is always the
    whole reply).
    """

    id: int
    request: Request
    budget: int  # most tokens to generate (0: score the prompt only)
    tokenizer: Any
    on_event: Callable[[StreamEvent], None] | None = None
    tokens: list[int] = field(default_factory=list)
    types: list[int] | None = None  # token types (sep format), one per token
    num_prompt: int = 0
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] | None = None  # of its full blocks, as far as known (prefix cache)
    salt: bytes = b""  # its LoRA adapter's key: KV is shared only with the same adapter
    registered: int = 0  # blocks of the table already offered to the prefix cache
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    status: Status = Status.WAITING
    admitted_once: bool = False
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    embed_sum: Any = None  # (hidden,) float64 sum of final hidden states (Request.embed)
    embed_rows: int = 0  # prompt rows summed into embed_sum (skipped when recomputed)
    buffer: deque[StreamEvent] = field(default_factory=deque)  # events without on_event
    processors: list[Any] = field(default_factory=list)  # the request's and its config's
    added_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    keep: int = 0  # a sliding window's head: tokens never dropped (GenerationConfig.keep)
    slides: int = 0  # times the window slid (Completion.slides)
    slid_tokens: int = 0  # tokens dropped from the window, in all (Completion.slid_tokens)
    context_capped: bool = False  # the context, not the lengths, limits the budget

    def __post_init__(self) -> None:
        req = self.request
        self.tokens = list(req.prompt_ids)
        self.num_prompt = len(self.tokens)
        if req.token_type_ids is not None:
            self.types = list(req.token_type_ids)
        self.stream = TextStream(self.tokenizer, req.config.stop)
        self.generator = None if req.config.greedy else make_generator(req.config.seed)

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.tokens) - self.num_computed

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.request.prompt_logprobs is not None

    @property
    def wants_all_rows(self) -> bool:
        """Every prompt row's features are needed (prompt logprobs, an embedding): the
        whole prompt is computed, none of it taken from the prefix cache."""
        return self.wants_prompt_logprobs or self.request.embed

    @property
    def prompt_ids(self) -> list[int]:
        """The whole prompt (the window's start may have slid past part of it)."""
        if self.slides:
            return list(self.request.prompt_ids)
        return self.tokens[: self.num_prompt]

    @property
    def history(self) -> list[int]:
        """The whole prompt and reply so far (what penalties and n-gram blocking see),
        whether or not the window still holds it all."""
        if self.slides:
            return [*self.request.prompt_ids, *self.generated]
        return self.tokens

    def slide(self, drop: int) -> None:
        """Drop ``drop`` tokens of the window after its first :attr:`keep` (the newest
        stay); the caller gives its KV back so the new window is computed from scratch."""
        lo, hi = self.keep, self.keep + drop
        assert drop >= 1 and hi < len(self.tokens), "a slide keeps the newest token"
        del self.tokens[lo:hi]
        if self.types is not None:
            del self.types[lo:hi]
        self.block_hashes = None  # they were of the old window
        self.slides += 1
        self.slid_tokens += drop

    def append(self, token: int) -> None:
        """A sampled token joins the sequence (fed to the model next step)."""
        self.tokens.append(token)
        self.generated.append(token)
        if self.types is not None:
            self.types.append(self.request.reply_token_type or 0)
