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

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


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
        self.config = config or GenerationConfig()
        self.budget = budget or BudgetConfig()
        self.engine = engine or Engine.shared(loaded)
        self.conversation = Conversation(system=system)
        self.last: Reply | None = None

    def stream(self, text: str) -> Iterator[str]:
        """Add a user message and yield the reply as it is generated.

        The reply is added to the conversation when the stream ends, also when
        it is interrupted (Ctrl-C, or the caller closing the iterator): then
        with the text produced so far and finish reason ``interrupted``.
        """
        messages = [*self.conversation.as_messages(), Message("user", text)]
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
        completion: Completion | None = None
        try:
            for ev in self.engine.stream([req]):
                if ev.text:
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
                )
            if completion.finish_reason == "error":  # nothing was said: take the turn back
                self.conversation.messages.pop()
                raise ChatforgeError(f"generation failed: {completion.error}")
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
            )
