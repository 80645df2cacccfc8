"""The conversation log: every chat exchange, in SQLite in the user data dir.

One row per conversation (model, backend, system prompt, times) and one per
message (role, text, and for replies the model, parameters, token counts and
timings). Rows are written as each message completes, so a crash loses at
most the reply being generated. WAL mode lets ``chatforge logs`` read while a
chat writes. The schema carries a version so later changes can migrate it.

    log = ConversationLog()                   # $CHATFORGE_DATA/conversations.sqlite3
    cid = log.new_conversation(model="smollm2")
    log.add_message(cid, "user", "hi")
    log.export_training(open("chats.jsonl", "w"))   # {"messages": [...]} per line

Every SQLite failure (a damaged file, a full disk) comes out of this class as
a :class:`LogError` whose one-line message names the file and says how to go
on: chat without the log (``--no-log``) or move the file aside.
"""

from __future__ import annotations

import errno
import json
import shlex
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from chatforge.errors import ChatforgeError

SCHEMA_VERSION = 1
"""Version of the tables below; bump it and add a migration when they change."""

LOG_FILE = "conversations.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,          -- unix time
    updated REAL NOT NULL,
    model TEXT,                     -- the model of the first reply (each message has its own)
    backend TEXT NOT NULL,          -- "local" | "remote"
    api_base TEXT,                  -- the endpoint, for remote chats
    system TEXT                     -- the system prompt (latest)
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    created REAL NOT NULL,
    role TEXT NOT NULL,             -- "user" | "assistant"
    content TEXT NOT NULL,
    model TEXT,                     -- replies only, from here on
    params TEXT,                    -- JSON of the generation settings
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    seconds REAL,                   -- request to end of reply
    first_token_seconds REAL        -- request to first text
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


class LogError(ChatforgeError):
    """The conversation log cannot be read or written (damaged file, full disk, ...)."""


# SQLite result codes (sqlite3.Error.sqlite_errorcode, Python >= 3.11).
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26


def _log_error(path: Path, e: Exception) -> LogError:
    """One line naming the file, what is wrong with it, and how to keep chatting."""
    code = getattr(e, "sqlite_errorcode", None)
    text = str(e) if isinstance(e, sqlite3.Error) else (getattr(e, "strerror", None) or str(e))
    q = shlex.quote(str(path))
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in text or "not a database" in text:
        bad = shlex.quote(str(path) + ".bad")
        return LogError(
            f"the conversation log {path} is damaged ({text}); chat without it with "
            f"--no-log, or move it aside (mv {q} {bad}) and a new log is started "
            f"(`sqlite3 {bad} .recover` may save its conversations)"
        )
    if code == _SQLITE_FULL or "disk is full" in text or getattr(e, "errno", None) == errno.ENOSPC:
        return LogError(
            f"cannot write the conversation log {path}: the disk is full; free some space "
            "(the conversation so far is logged; `--continue` picks it up) or chat with --no-log"
        )
    return LogError(f"the conversation log {path} failed ({text}); chat with --no-log to skip it")


@dataclass
class LoggedMessage:
    """One stored message."""

    role: str
    content: str
    created: float
    model: str | None = None
    params: dict[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    seconds: float | None = None
    first_token_seconds: float | None = None


@dataclass
class LoggedConversation:
    """One stored conversation (``messages`` filled by :meth:`ConversationLog.get`)."""

    id: int
    created: float
    updated: float
    model: str | None
    backend: str
    api_base: str | None
    system: str | None
    n_messages: int = 0
    preview: str = ""  # the first user message, shortened
    messages: list[LoggedMessage] = field(default_factory=list)

    def training_messages(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style messages for training: the system prompt,
        then user/assistant turns, without an unanswered user message at the end and
        without empty replies."""
        out: list[dict[str, str]] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        for m in self.messages:
            if m.role == "assistant" and not m.content.strip():
                if out and out[-1]["role"] == "user":
                    out.pop()  # a question without an answer teaches nothing
                continue
            out.append({"role": m.role, "content": m.content})
        while out and out[-1]["role"] != "assistant":
            out.pop()
        return out


def default_path() -> Path:
    from chatforge.paths import data_dir

    return data_dir() / LOG_FILE


class ConversationLog:
    """The SQLite conversation log (created on first use)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ChatforgeError(f"cannot create the conversation log {self.path}: {e}") from e
        with self._guard():
            # check_same_thread off: a chat may write from a worker thread; we serialise.
            self.db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
            except BaseException:
                self.db.close()
                raise

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn SQLite's (and the disk's) failures into one-line :class:`LogError`s."""
        try:
            yield
        except (sqlite3.Error, OSError) as e:
            raise _log_error(self.path, e) from e

    def _migrate(self) -> None:
        with self.db:
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                self.db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif not isinstance(row[0], int):  # a damaged page can read as anything
                raise sqlite3.DatabaseError("database disk image is malformed")
            elif row[0] > SCHEMA_VERSION:
                raise ChatforgeError(
                    f"the conversation log {self.path} has schema {row[0]}, newer than this "
                    f"chatforge understands ({SCHEMA_VERSION}); upgrade chatforge"
                )

    def close(self) -> None:
        self.db.close()

    # ---------------------------------------------------------------- writing

    def new_conversation(
        self,
        model: str | None = None,
        backend: str = "local",
        api_base: str | None = None,
        system: str | None = None,
    ) -> int:
        now = time.time()
        with self._guard(), self.db:
            cur = self.db.execute(
                "INSERT INTO conversations (created, updated, model, backend, api_base, system) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (now, now, model, backend, api_base, system),
            )
        return int(cur.lastrowid)

    def set_system(self, cid: int, system: str | None) -> None:
        with self._guard(), self.db:
            self.db.execute(
                "UPDATE conversations SET system = ?, updated = ? WHERE id = ?",
                (system, time.time(), cid),
            )

    def add_message(self, cid: int, role: str, content: str, **stats: Any) -> None:
        """Append a message; ``stats`` are the LoggedMessage fields of a reply."""
        params = stats.get("params")
        now = time.time()
        with self._guard(), self.db:
            self.db.execute(
                "INSERT INTO messages (conversation_id, created, role, content, model, params, "
                "prompt_tokens, completion_tokens, finish_reason, seconds, first_token_seconds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cid,
                    now,
                    role,
                    content,
                    stats.get("model"),
                    json.dumps(params) if params is not None else None,
                    stats.get("prompt_tokens"),
                    stats.get("completion_tokens"),
                    stats.get("finish_reason"),
                    stats.get("seconds"),
                    stats.get("first_token_seconds"),
                ),
            )
            self.db.execute(
                "UPDATE conversations SET updated = ?, model = COALESCE(model, ?) WHERE id = ?",
                (now, stats.get("model"), cid),
            )

    # ---------------------------------------------------------------- reading

    _LIST = (
        "SELECT c.id, c.created, c.updated, c.model, c.backend, c.api_base, c.system, "
        "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id), "
        "(SELECT content FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user' "
        " ORDER BY m.id LIMIT 1) "
        "FROM conversations c"
    )

    def _conv(self, row: tuple) -> LoggedConversation:
        preview = " ".join((row[8] or "").split())
        return LoggedConversation(
            *row[:7], n_messages=row[7], preview=preview[:70] + ("..." if len(preview) > 70 else "")
        )

    def list(self, limit: int | None = 20) -> list[LoggedConversation]:
        """Conversations with at least one message, most recently updated first."""
        sql = self._LIST + " WHERE EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id)"
        sql += " ORDER BY c.updated DESC, c.id DESC"
        args: tuple = ()
        if limit is not None:
            sql += " LIMIT ?"
            args = (limit,)
        with self._guard():
            return [self._conv(r) for r in self.db.execute(sql, args)]

    def latest(self) -> LoggedConversation | None:
        found = self.list(limit=1)
        return self.get(found[0].id) if found else None

    def get(self, cid: int) -> LoggedConversation:
        """A conversation with its messages; ChatforgeError when there is none."""
        with self._guard():
            return self._get(cid)

    def _get(self, cid: int) -> LoggedConversation:
        row = self.db.execute(self._LIST + " WHERE c.id = ?", (cid,)).fetchone()
        if row is None:
            raise ChatforgeError(f"no conversation {cid} in the log; see `chatforge logs list`")
        conv = self._conv(row)
        for r in self.db.execute(
            "SELECT role, content, created, model, params, prompt_tokens, completion_tokens, "
            "finish_reason, seconds, first_token_seconds FROM messages "
            "WHERE conversation_id = ? ORDER BY id",
            (cid,),
        ):
            params = json.loads(r[4]) if r[4] else None
            conv.messages.append(LoggedMessage(r[0], r[1], r[2], r[3], params, *r[5:]))
        return conv

    def search(self, text: str, limit: int | None = 50) -> list[LoggedConversation]:
        """Conversations with a message (or system prompt) containing ``text`` (any case)."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql = (
            self._LIST + " WHERE EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id "
            "AND m.content LIKE ? ESCAPE '\\') OR (c.system LIKE ? ESCAPE '\\' AND EXISTS "
            "(SELECT 1 FROM messages m WHERE m.conversation_id = c.id)) "
            "ORDER BY c.updated DESC, c.id DESC"
        )
        args: tuple = (pattern, pattern)
        if limit is not None:
            sql += " LIMIT ?"
            args = (*args, limit)
        with self._guard():
            return [self._conv(r) for r in self.db.execute(sql, args)]

    def conversations(self) -> Iterator[LoggedConversation]:
        """Every conversation with its messages, oldest first."""
        with self._guard():
            ids = [r[0] for r in self.db.execute("SELECT id FROM conversations ORDER BY id")]
        for cid in ids:
            yield self.get(cid)

    def export_training(self, out: TextIO) -> int:
        """Write ``{"messages": [...]}`` JSONL (what ``chatforge train`` reads), one
        conversation per line; conversations without a reply are left out. Returns
        the number written."""
        n = 0
        for conv in self.conversations():
            msgs = conv.training_messages()
            if any(m["role"] == "assistant" for m in msgs):
                out.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
                n += 1
        return n
