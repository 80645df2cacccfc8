"""A chat session that writes every exchange to the conversation log.

:class:`LoggedSession` wraps a :class:`~chatforge.chat.ChatSession` or a
:class:`~chatforge.remote.RemoteSession` (anything with ``stream``/``send``/
``reset``/``system``/``config``/``last``/``conversation``) and presents the
same interface, so the chat command uses it without knowing it is there.

It remembers the log ids of the last exchange (:attr:`LoggedSession.user_id`,
:attr:`LoggedSession.reply_id`), which the chat's judgement commands name, and
:meth:`LoggedSession.begin_retry` makes the next reply a retry: the question is
not logged again and the earlier reply is kept beside the new one as an alternative.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from chatforge.conversation import Message
from chatforge.store.log import ConversationLog, LoggedConversation

# Attributes that belong to the wrapper; everything else is the wrapped session's.
_OWN = frozenset(
    {"session", "log", "model_name", "backend", "api_base", "cid", "user_id", "reply_id", "_retry"}
)


def _history(conv: LoggedConversation) -> list[Message]:
    """The history a live session would hold after these logged messages: user and
    assistant messages (an edited reply as edited), less the replies that were
    interrupted (a partial reply is never sent back to the model; the session joins
    the user messages around it). Alternatives are not in ``conv.messages``."""
    return [
        Message(m.role, m.final_text)
        for m in conv.messages
        if m.role == "user"
        or (m.role == "assistant" and (m.finish_reason != "interrupted" or m.edit is not None))
    ]


class LoggedSession:
    """Delegates to ``session``; logs each user message and reply as it completes."""

    def __init__(
        self,
        session: Any,
        log: ConversationLog,
        model_name: str,
        backend: str = "local",
        api_base: str | None = None,
    ) -> None:
        self.session = session
        self.log = log
        self.model_name = model_name  # recorded with each reply
        self.backend = backend  # "local" | "remote"
        self.api_base = api_base
        self.cid: int | None = None  # created with the first message, so no empty rows
        self.user_id: int | None = None  # log ids of the last question and its reply
        self.reply_id: int | None = None
        self._retry: tuple[int, int | None] | None = None  # (question, earlier reply) ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)  # ``system``: through its setter, logged
        else:  # config, and anything else the chat command sets, go to the session
            setattr(self.session, name, value)

    @property
    def system(self) -> str | None:
        return self.session.system

    @system.setter
    def system(self, text: str | None) -> None:
        self.session.system = text
        if self.cid is not None:
            self.log.set_system(self.cid, self.session.system)

    def reset(self) -> None:
        """A new conversation, in the session and in the log."""
        self.session.reset()
        self.cid = None
        self.user_id = self.reply_id = None

    def begin_retry(self) -> bool:
        """Make the next :meth:`stream` a retry of the last question: it is not logged
        again, and the reply it had becomes an alternative of the new one (a pair to
        judge). False when the log's last row is not that exchange (the caller then
        logs the history afresh)."""
        if self.cid is None or self.user_id is None:
            return False
        if not self.log.only_replies_after(self.cid, self.user_id):
            return False  # something came after it (a system prompt change)
        self._retry = (self.user_id, self.reply_id)
        return True

    def resume(self, conv: LoggedConversation) -> None:
        """Continue a logged conversation: its system prompt and messages become the history."""
        self.session.reset()
        self.session.system = conv.system
        self.session.conversation.messages = _history(conv)
        self.cid = conv.id
        self.user_id = self.reply_id = None
        for m in conv.messages:
            if m.role == "user":
                self.user_id, self.reply_id = m.id, None
            elif m.role == "assistant":
                self.reply_id = m.id

    def send(self, text: str) -> Any:
        for _ in self.stream(text):
            pass
        return self.session.last

    def stream(self, text: str) -> Iterator[str]:
        """The wrapped session's stream; the user message is logged once the reply has
        started (a prompt the model rejected is not logged), the reply when it ends."""
        before = self.session.last
        t0 = time.perf_counter()
        first: float | None = None
        retry, self._retry = self._retry, None
        logged_user = retry is not None  # a retry's question is in the log already
        inner = self.session.stream(text)
        try:
            for piece in inner:
                if first is None:
                    first = time.perf_counter() - t0
                    if not logged_user:
                        self._log_user(text)
                        logged_user = True
                yield piece
        finally:
            # Closed part way (Ctrl-C, the caller stopping): let the session record the
            # interrupted reply before reading it, or it would not be logged at all.
            inner.close()
            reply = self.session.last
            if reply is not None and reply is not before:
                if not logged_user:
                    self._log_user(text)
                self.reply_id = self.log.add_message(
                    self._conversation(),
                    "assistant",
                    reply.text,
                    model=self.model_name,
                    params=reply.config.to_dict(),
                    prompt_tokens=reply.prompt_tokens,
                    completion_tokens=reply.completion_tokens,
                    finish_reason=reply.finish_reason,
                    seconds=round(reply.seconds, 4),
                    first_token_seconds=None if first is None else round(first, 4),
                )
                if retry is not None and retry[1] is not None:
                    self.log.set_alternative(retry[1], self.reply_id)

    def _conversation(self) -> int:
        if self.cid is None:
            self.cid = self.log.new_conversation(
                model=self.model_name,
                backend=self.backend,
                api_base=self.api_base,
                system=self.session.system,
            )
        return self.cid

    def _log_user(self, text: str) -> None:
        self.user_id = self.log.add_message(self._conversation(), "user", text)
        self.reply_id = None
