"""A chat session: a conversation, a model, a generation config, a context budget.

This is the library form of ``chatforge chat``::

    from chatforge import ChatSession, load_model
    chat = ChatSession(load_model("smollm2"), system="You are terse.")
    print(chat.send("What is the capital of France?").text)
    for piece in chat.stream("And of Italy?"):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from chatforge.conversation import BudgetConfig, Conversation, Message
from chatforge.errors import ChatforgeError
from chatforge.generation.config import GenerationConfig
from chatforge.generation.engine import Completion, Engine
from chatforge.generation.plan import plan_request


@dataclass
class Reply:
    """One assistant reply and how it was made."""

    text: str
    finish_reason: str  # "stop" | "length" | "interrupted"
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    dropped: list[Message] = field(default_factory=list)  # history left out to fit the context
    config: GenerationConfig = field(default_factory=GenerationConfig)
    cached_tokens: int = 0  # prompt tokens reused from the previous turns' KV cache
    first_token_seconds: float | None = None  # time to first token
    slid_tokens: int = 0  # oldest tokens dropped to go past the context (config.slide)
    context_full: bool = False  # "length" because the context was full (no slide)

    @property
    def tokens_per_second(self) -> float:
        """Reply tokens per second over the whole reply (time to first token included)."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Reply tokens per second after the first one (``None`` when not measurable)."""
        if self.first_token_seconds is None or self.completion_tokens < 2:
            return None
        span = self.seconds - self.first_token_seconds
        return (self.completion_tokens - 1) / span if span > 0 else None


def model_messages(conversation: Conversation, text: str) -> list[Message]:
    """The messages a model is sent for a new user message ``text``.

    The history, then ``text``. A user message whose reply was interrupted has
    no assistant turn after it (a partial reply is never sent back to the
    model); it is joined with the next user message so roles still alternate,
    as many chat templates require.
    """
    out: list[Message] = []
    for m in [*conversation.as_messages(), Message("user", text)]:
        if m.role == "user" and out and out[-1].role == "user":
            out[-1] = Message("user", out[-1].content + "\n\n" + m.content)
        else:
            out.append(m)
    return out


class SessionBase:
    """What local and remote chat sessions share: the conversation and ``send``.

    Subclasses set ``conversation`` and ``last`` and implement ``stream(text)``.
    """

    conversation: Conversation
    last: Reply | None

    @property
    def system(self) -> str | None:
        return self.conversation.system

    @system.setter
    def system(self, text: str | None) -> None:
        self.conversation.system = text or None

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.conversation.reset()

    def send(self, text: str) -> Reply:
        """Add a user message and return the whole reply."""
        for _ in self.stream(text):
            pass
        assert self.last is not None
        return self.last

    def stream(self, text: str) -> Iterator[str]:  # pragma: no cover - abstract
        raise NotImplementedError


class ChatSession(SessionBase):
    """A multi-turn conversation with a local model."""

    def __init__(
        self,
        loaded: Any,
        config: GenerationConfig | None = None,
        system: str | None = None,
        budget: BudgetConfig | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.loaded = loaded
        self.config = config or GenerationConfig.default()  # the CLI's defaults
        self.budget = budget or BudgetConfig()
        self.engine = engine or Engine.shared(loaded)
        self.conversation = Conversation(system=system)
        self.last: Reply | None = None

    def stream(self, text: str) -> Iterator[str]:
        """Add a user message and yield the reply as it is generated.

        The reply is added to the conversation when the stream ends. An
        interrupted reply (Ctrl-C, or the caller closing the iterator) is only
        kept in :attr:`last`, with the text produced so far and finish reason
        ``interrupted``: the conversation keeps the user message but not the
        partial reply, so the model never sees it in a later request.
        """
        messages = model_messages(self.conversation, text)
        plan = plan_request(
            self.loaded.format,
            messages,
            self.loaded.info.context_length,
            self.config,
            budget=self.budget,
        )
        self.conversation.add_user(text)
        req = plan.request
        t0 = time.perf_counter()
        parts: list[str] = []
        first: float | None = None  # seconds to the first text, kept if Ctrl-C ends the reply
        completion: Completion | None = None
        try:
            for ev in self.engine.stream([req]):
                if ev.text:
                    if first is None:
                        first = time.perf_counter() - t0
                    parts.append(ev.text)
                    yield ev.text
                if ev.completion is not None:
                    completion = ev.completion
        finally:
            if completion is None:  # interrupted: keep what was said so far
                completion = Completion(
                    text="".join(parts),
                    token_ids=[],
                    finish_reason="interrupted",
                    prompt_tokens=plan.prompt_tokens,
                    completion_tokens=len(
                        self.engine.tokenizer.encode("".join(parts), add_special_tokens=False)
                    ),
                    seconds=time.perf_counter() - t0,
                    first_token_seconds=first,
                )
            if completion.finish_reason == "error":  # nothing was said: take the turn back
                self.conversation.messages.pop()
                raise ChatforgeError(f"generation failed: {completion.error}")
            if completion.finish_reason != "interrupted":
                self.conversation.add_assistant(completion.text)
            self.last = Reply(
                text=completion.text,
                finish_reason=completion.finish_reason,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                seconds=completion.seconds,
                dropped=plan.dropped,
                config=self.config,
                cached_tokens=completion.cached_tokens,
                first_token_seconds=completion.first_token_seconds,
                slid_tokens=completion.slid_tokens,
                context_full=completion.context_full,
            )
