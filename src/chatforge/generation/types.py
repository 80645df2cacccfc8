"""The engine's request and result types."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from chatforge.generation.config import GenerationConfig

MAX_TOP_LOGPROBS = 20
"""Most alternatives a request may ask for per token (OpenAI's limit)."""


@dataclass
class Request:
    """One prompt to complete."""

    prompt_ids: list[int]
    """The prompt, already rendered in the model's prompt format."""
    config: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling settings and limits of this request (a batch may mix them)."""
    token_type_ids: list[int] | None = None
    """Per-token type ids of the prompt (sep format only)."""
    reply_token_type: int | None = None
    """Token type id that generated tokens take (sep format only)."""
    max_new_tokens: int | None = None
    """A resolved reply budget (e.g. from the history budget); also capped by the config.
    ``0`` scores the prompt without generating (with ``prompt_logprobs``)."""
    logprobs: int | None = None
    """Report each generated token's logprob and this many most likely alternatives
    (0..20); None: no logprobs."""
    prompt_logprobs: int | None = None
    """Report every prompt token's logprob (and this many alternatives, 0..20) from the
    prefill; None: none. Such a request computes its whole prompt (no prefix reuse)."""
    processors: list[Any] = field(default_factory=list)
    """Per-sequence logits processors (:class:`~chatforge.generation.processors.LogitsProcessor`)
    applied to this request's logits before sampling."""
    adapter: str | None = None
    """The LoRA adapter (loaded with :meth:`Engine.add_adapter`) applied to this request;
    None: the base model. A batch may mix adapters and the base."""
    embed: bool = False
    """Compute an embedding of the prompt (the mean of its tokens' final hidden states,
    L2-normalised) instead of generating: needs ``max_new_tokens=0``; like
    ``prompt_logprobs``, the whole prompt is computed (no prefix reuse)."""
    keep_tokens: int | None = None
    """The head of the prompt a sliding reply never drops (``GenerationConfig.slide``)
    when the config's ``keep`` is None: ``plan_request`` sets it to the rendered system
    prompt's tokens. None: no head."""


@dataclass
class TokenLogprob:
    """One token and its log-probability under the model (before temperature or filters)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    """The most likely tokens at that position, ``(token_id, logprob)``, best first."""


@dataclass
class Completion:
    """The result of one request."""

    text: str  # the reply; a stop token or stop string that ended it is not in it
    token_ids: list[int]  # generated, with the stop token that ended it (as vLLM counts)
    finish_reason: (
        str  # "stop" (EOS, separator or stop string) | "length" | "interrupted" | "error"
    )
    prompt_tokens: int
    completion_tokens: int  # generated tokens; a stop token that ended the reply counts
    seconds: float  # from the request being queued to its end
    first_token_seconds: float | None = None  # time to first token, from being queued
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # per generated token (Request.logprobs)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token; first None
    error: str | None = None  # why the request failed (finish_reason "error")
    embedding: list[float] | None = None  # (hidden,) unit vector, for Request.embed
    slides: int = 0  # times the window slid past the context (GenerationConfig.slide)
    slid_tokens: int = 0  # tokens dropped from the window by those slides, in all
    context_full: bool = False  # "length" because the context was full, not max_new_tokens

    def to_dict(self) -> dict:
        """The numbers a transcript or an output row records."""
        return {
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "seconds": round(self.seconds, 4),
            "first_token_seconds": (
                None if self.first_token_seconds is None else round(self.first_token_seconds, 4)
            ),
            **({"slid_tokens": self.slid_tokens} if self.slides else {}),
            **({"context_full": True} if self.context_full else {}),
        }


@dataclass
class StreamEvent:
    """Newly final text of the request ``index``; ``completion`` is set on its last event."""

    index: Hashable
    text: str
    completion: Completion | None = None
    tokens: list[TokenLogprob] = field(default_factory=list)
    """Tokens generated since the previous event (with logprobs when asked for;
    ``logprob`` is NaN otherwise). Text may lag tokens (UTF-8, stop strings)."""
