"""The engine's request and result types."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from chatforge.generation.config import GenerationConfig


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
    """A resolved reply budget (e.g. from the history budget); also capped by the config."""


@dataclass
class Completion:
    """The result of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, separator or stop string) | "length" | "interrupted"
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # from the request being queued to its end
    first_token_seconds: float | None = None  # time to first token, from being queued

    def to_dict(self) -> dict:
        """The numbers a transcript or an output row records."""
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
    """Newly final text of the request ``index``; ``completion`` is set on its last event."""

    index: Hashable
    text: str
    completion: Completion | None = None
