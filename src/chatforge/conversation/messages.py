"""Chat messages and a conversation (a system prompt plus user/assistant messages)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

from chatforge.errors import InputError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass
class Message:
    """One message of a chat."""

    role: Role
    """Who speaks: ``"system"``, ``"user"`` or ``"assistant"``."""
    content: str
    """The message text."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InputError(f"unknown message role {self.role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise InputError(f"message content must be a string, got {type(self.content).__name__}")

    def to_dict(self) -> dict[str, str]:
        """The OpenAI / Hugging Face shape: ``{"role": ..., "content": ...}``."""
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Message:
        """Build a message from ``{"role": ..., "content": ...}`` (other keys are ignored)."""
        missing = [k for k in ("role", "content") if k not in data]
        if missing:
            raise InputError(f"a message needs 'role' and 'content'; missing {', '.join(missing)}")
        content = data["content"]
        return cls(role=data["role"], content="" if content is None else content)


def as_message(m: Message | Mapping[str, Any]) -> Message:
    """Accept a :class:`Message` or a ``{"role", "content"}`` dict."""
    return m if isinstance(m, Message) else Message.from_dict(m)


class Turn(NamedTuple):
    """A user message and the assistant reply after it (``None`` while unanswered).

    ``user`` is ``None`` only for an assistant message that no user message
    precedes (a greeting at the start of a conversation).
    """

    user: Message | None
    assistant: Message | None


@dataclass
class Conversation:
    """A system prompt (optional) and the user/assistant messages after it."""

    system: str | None = None
    """The system prompt, kept when history is dropped; ``None`` for none."""
    messages: list[Message] = field(default_factory=list)
    """User and assistant messages, oldest first (no system messages)."""

    def __post_init__(self) -> None:
        self.messages = [as_message(m) for m in self.messages]
        if any(m.role == "system" for m in self.messages):
            raise InputError("put the system prompt in Conversation.system, not in messages")

    def add_user(self, content: str) -> Message:
        msg = Message("user", content)
        self.messages.append(msg)
        return msg

    def add_assistant(self, content: str) -> Message:
        msg = Message("assistant", content)
        self.messages.append(msg)
        return msg

    def reset(self) -> None:
        """Forget the messages; keep the system prompt."""
        self.messages.clear()

    def as_messages(self) -> list[Message]:
        """All messages to send, the system prompt first when there is one."""
        head = [Message("system", self.system)] if self.system is not None else []
        return head + list(self.messages)

    def turns(self) -> list[Turn]:
        """Group the messages into turns (see :class:`Turn`)."""
        out: list[Turn] = []
        for m in self.messages:
            if m.role == "user":
                out.append(Turn(m, None))
            elif out and out[-1].assistant is None and out[-1].user is not None:
                out[-1] = Turn(out[-1].user, m)
            else:
                out.append(Turn(None, m))
        return out
