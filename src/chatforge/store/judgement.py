"""Judgements: what a person said about a reply, kept beside it in the conversation log.

Four kinds, one row each in the log's ``judgements`` table:

- ``good`` / ``bad``: a thumbs up or down on one reply (the latest of the two counts);
- ``edit``: the person's own text for the reply (the original is kept; the latest
  edit is what the conversation goes on from, and what the training export uses);
- ``pick``: of two or more replies to the same prompt, this one is better than
  ``other_id`` (one row per reply not chosen).

``source`` says where it was given: ``chat`` (the REPL), ``web`` (the page), ``api``
(``POST /v1/feedback``). :func:`check_judgement` is the one validation all three use.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

from chatforge.errors import ChatforgeError

KINDS = ("good", "bad", "edit", "pick")
"""The kinds of judgement, as stored."""

SOURCES = ("chat", "web", "api")
"""Where a judgement was given."""


@dataclass
class Judgement:
    """One stored judgement of the reply ``message_id``."""

    id: int
    created: float
    conversation_id: int
    message_id: int
    kind: str  # one of KINDS
    other_id: int | None = None  # pick: the reply not chosen
    text: str | None = None  # edit: the replacement text
    source: str | None = None  # one of SOURCES; None: not recorded


def check_judgement(kind: str, other_id: int | None, text: str | None, source: str) -> None:
    """Raise a one-line :class:`ChatforgeError` when these do not make a judgement."""
    if kind not in KINDS:
        raise ChatforgeError(f"unknown judgement {kind!r}; use one of {', '.join(KINDS)}")
    if source not in SOURCES:
        known = ", ".join(SOURCES)
        raise ChatforgeError(f"unknown judgement source {source!r}; use one of {known}")
    if kind == "pick" and other_id is None:
        raise ChatforgeError("a pick needs the reply that was not chosen (other_id)")
    if kind != "pick" and other_id is not None:
        raise ChatforgeError(f"only a pick names another reply, not {kind!r}")
    if kind == "edit" and not (text or "").strip():
        raise ChatforgeError("an edit needs the new text (it is empty)")
    if kind != "edit" and text is not None:
        raise ChatforgeError(f"only an edit has text, not {kind!r}")


def latest_edit(judgements: list[Judgement]) -> str | None:
    """The text of the latest edit among ``judgements`` (None: never edited)."""
    edits = [j for j in judgements if j.kind == "edit"]
    return edits[-1].text if edits else None


def verdict(judgements: list[Judgement]) -> str | None:
    """``good`` or ``bad``: the latest thumbs given (None: neither)."""
    thumbs = [j.kind for j in judgements if j.kind in ("good", "bad")]
    return thumbs[-1] if thumbs else None


class JudgementMethods:
    """The conversation log's judgement methods (:class:`~chatforge.store.ConversationLog`
    has them): recording judgements, and which reply of a prompt is on the main line."""

    db: sqlite3.Connection

    def _guard(self) -> AbstractContextManager[None]:  # pragma: no cover - the log's
        raise NotImplementedError

    def judge(
        self,
        message_id: int,
        kind: str,
        *,
        other_id: int | None = None,
        text: str | None = None,
        source: str = "chat",
    ) -> int:
        """Record a judgement of the reply ``message_id`` and return its id: ``good``,
        ``bad``, ``edit`` (``text``: the new text; the reply itself is kept) or
        ``pick`` (this reply beats ``other_id``, a reply to the same prompt)."""
        check_judgement(kind, other_id, text, source)
        with self._guard(), self.db:
            cid = self._check_reply(message_id, None, "the reply judged")
            if other_id is not None:
                if other_id == message_id:
                    raise ChatforgeError("a pick needs two different replies")
                self._check_reply(other_id, cid, "other_id")
            cur = self.db.execute(
                "INSERT INTO judgements (created, conversation_id, message_id, kind, other_id, "
                "text, source) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), cid, message_id, kind, other_id, text, source),
            )
        return int(cur.lastrowid)

    def set_alternative(self, message_id: int, main_id: int) -> None:
        """Make the reply ``message_id`` (and its own alternatives) alternatives of
        ``main_id``, a reply to the same prompt that takes its place on the main line."""
        with self._guard(), self.db:
            cid = self._check_reply(main_id, None, "main reply")
            self._check_reply(message_id, cid, "alternative")
            self.db.execute(
                "UPDATE messages SET alt_of = ? WHERE (id = ? OR alt_of = ?) AND id != ?",
                (main_id, message_id, message_id, main_id),
            )
            self.db.execute("UPDATE messages SET alt_of = NULL WHERE id = ?", (main_id,))

    def promote(self, message_id: int) -> None:
        """Put the alternative ``message_id`` on the main line in place of its reply
        (which becomes an alternative, with the others). A main-line reply: nothing to do."""
        with self._guard():
            row = self.db.execute("SELECT alt_of FROM messages WHERE id = ?", (message_id,))
            found = row.fetchone()
        if found is None:
            raise ChatforgeError(f"no message {message_id} in the log")
        if found[0] is not None:
            self.set_alternative(found[0], message_id)

    def judgements(self, cid: int) -> list[Judgement]:
        """A conversation's judgements, oldest first."""
        with self._guard():
            rows = self.db.execute(
                "SELECT id, created, conversation_id, message_id, kind, other_id, text, source "
                "FROM judgements WHERE conversation_id = ? ORDER BY id",
                (cid,),
            ).fetchall()
        return [Judgement(*r) for r in rows]

    def only_replies_after(self, cid: int, message_id: int) -> bool:
        """Whether every row of conversation ``cid`` after ``message_id`` (a question)
        is a reply to it: then a retry's reply can stand beside them."""
        sql = (
            "SELECT 1 FROM messages WHERE conversation_id = ? AND id > ? "
            "AND role != 'assistant' LIMIT 1"
        )
        with self._guard():
            return self.db.execute(sql, (cid, message_id)).fetchone() is None

    def _check_reply(self, message_id: int, cid: int | None, what: str) -> int:
        """The conversation of the reply ``message_id``; an error naming ``what`` when
        there is no such reply (or it is in another conversation than ``cid``)."""
        row = self.db.execute(
            "SELECT conversation_id, role FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        if row is None:
            raise ChatforgeError(f"{what}: no message {message_id} in the log")
        if row[1] != "assistant":
            raise ChatforgeError(f"{what}: message {message_id} is a {row[1]} message, not a reply")
        if cid is not None and row[0] != cid:
            raise ChatforgeError(
                f"{what}: message {message_id} is in conversation {row[0]}, not {cid}"
            )
        return int(row[0])
