"""The conversation log: every chat exchange, in SQLite in the user data dir.

One row per conversation (model, backend, system prompt, times) and one per
message (role, text, and for replies the model, parameters, token counts,
timings and finish reason: ``stop``, ``length``, ``interrupted``, ``error``;
NULL in rows from before it was recorded). A system prompt changed part way
through a conversation is a ``system`` row at the point of the change.

The *main line* of a conversation is its messages with ``alt_of`` NULL: what the
model saw. A reply with ``alt_of`` set is an alternative to that main-line reply
(the earlier reply of a ``/retry``, a losing column of the page's compare mode);
alternatives are kept for judging but never become history or training turns.
Judgements (good, bad, edit, pick: :mod:`chatforge.store.judgement`) are rows of
their own; an edit keeps the original reply, and the latest edit's text is what
``--continue`` and the training export use in its place.
Rows are written as each message completes, so a crash loses at most the
reply being generated. WAL mode lets ``chatforge logs`` read while a
chat writes. The schema carries a version so later changes can migrate it.

    log = ConversationLog()                   # $CHATFORGE_DATA/conversations.sqlite3
    cid = log.new_conversation(model="smollm2")
    log.add_message(cid, "user", "hi")
    log.add_message(cid, "assistant", "hello", model="smollm2", finish_reason="stop")
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
from typing import TYPE_CHECKING, Any, TextIO

from chatforge.errors import ChatforgeError
from chatforge.store.judgement import Judgement, JudgementMethods, latest_edit, verdict

if TYPE_CHECKING:
    from chatforge.store.preference import PreferenceCounts

SCHEMA_VERSION = 3
"""Version of the tables below; bump it and add a migration when they change."""

LOG_FILE = "conversations.sqlite3"

_V3_TABLES = (
    """CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,  -- the reply judged
    kind TEXT NOT NULL,             -- good | bad | edit | pick
    other_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,  -- pick: the reply not chosen
    text TEXT,                      -- edit: the person's text for the reply
    source TEXT                     -- chat | web | api
)""",
    "CREATE INDEX IF NOT EXISTS judgements_by_conversation ON judgements(conversation_id, id)",
    "CREATE INDEX IF NOT EXISTS messages_by_response ON messages(response_id)",
)
"""What schema 3 adds besides the two ``messages`` columns (new files and the migration)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,          -- unix time
    updated REAL NOT NULL,
    model TEXT,                     -- the model of the first reply (each message has its own)
    backend TEXT NOT NULL,          -- "local" | "remote"
    api_base TEXT,                  -- the endpoint, for remote chats
    system TEXT,                    -- the system prompt (latest: what --continue restores)
    first_system TEXT               -- the system prompt the conversation started with
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    created REAL NOT NULL,
    role TEXT NOT NULL,             -- "user" | "assistant" | "system" (a mid-chat change)
    content TEXT NOT NULL,
    model TEXT,                     -- replies only, from here on
    params TEXT,                    -- JSON of the generation settings
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,             -- replies: stop | length | interrupted | error; NULL unknown
    seconds REAL,                   -- request to end of reply
    first_token_seconds REAL,       -- request to first text
    alt_of INTEGER REFERENCES messages(id),  -- an alternative to this main-line reply
    response_id TEXT                -- the server's id of a served reply
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
""" + "".join(f"{statement};\n" for statement in _V3_TABLES)


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


FINISH_INTERRUPTED = "interrupted"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"


@dataclass
class LoggedMessage:
    """One stored message (``role`` "system": the system prompt changed here)."""

    role: str
    content: str
    created: float
    model: str | None = None
    params: dict[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None  # replies; None: not recorded (older logs)
    seconds: float | None = None
    first_token_seconds: float | None = None
    id: int | None = None  # the row's id (None: not read from the log)
    alt_of: int | None = None  # an alternative reply: the main-line reply it stands beside
    response_id: str | None = None  # a served reply's id (``chatcmpl-...``)
    judgements: list[Judgement] = field(default_factory=list)  # of this reply, oldest first
    alternatives: list[LoggedMessage] = field(default_factory=list)  # main-line replies only

    @property
    def edit(self) -> str | None:
        """The latest edit's text (None: not edited)."""
        return latest_edit(self.judgements)

    @property
    def final_text(self) -> str:
        """What the conversation goes on from: the latest edit, else the reply as written."""
        edited = self.edit
        return edited if edited is not None else self.content

    @property
    def verdict(self) -> str | None:
        """The latest thumbs given to it: ``good``, ``bad`` or None."""
        return verdict(self.judgements)

    @property
    def sent(self) -> bool:
        """Whether this message went back to the model as history: replies that were
        interrupted or failed did not, unless the person edited them into shape."""
        if self.role != "assistant" or self.edit is not None:
            return True
        return self.finish_reason not in (FINISH_INTERRUPTED, FINISH_ERROR)


def _trainable(reply: LoggedMessage, include_interrupted: bool, include_truncated: bool) -> bool:
    """Whether a reply is fit to learn from: not empty, not failed, and not cut short
    (interrupted by the user, or stopped at the token limit) unless asked for. An
    edited reply is the person's text: fit whenever it is not empty."""
    if reply.edit is not None:
        return bool(reply.edit.strip())
    if not reply.content.strip() or reply.finish_reason == FINISH_ERROR:
        return False
    if reply.finish_reason == FINISH_INTERRUPTED:
        return include_interrupted
    if reply.finish_reason == FINISH_LENGTH:
        return include_truncated
    return True  # "stop", and None (unknown, from before finish reasons were logged)


def _turn_pairs(
    msgs: list[LoggedMessage], include_interrupted: bool, include_truncated: bool
) -> list[dict[str, str]]:
    """User/assistant pairs whose reply is trainable; a question without a (kept)
    answer is left out with it."""
    out: list[dict[str, str]] = []
    question: LoggedMessage | None = None
    for m in msgs:
        if m.role == "user":
            question = m  # an earlier unanswered one is dropped
        elif m.role == "assistant" and question is not None:
            if _trainable(m, include_interrupted, include_truncated):
                out.append({"role": "user", "content": question.content})
                out.append({"role": "assistant", "content": m.final_text})
            question = None
    return out


@dataclass
class LoggedConversation:
    """One stored conversation (``messages`` filled by :meth:`ConversationLog.get`)."""

    id: int
    created: float
    updated: float
    model: str | None
    backend: str
    api_base: str | None
    system: str | None  # the latest system prompt: what --continue restores
    n_messages: int = 0  # user and assistant messages
    preview: str = ""  # the first user message, shortened
    messages: list[LoggedMessage] = field(default_factory=list)
    first_system: str | None = None  # the system prompt it started with
    n_turns: int = 0  # user messages
    n_judgements: int = 0  # judgements of its replies (good, bad, edit, pick)

    @property
    def initial_system(self) -> str | None:
        """The system prompt in force for the first message."""
        changed = any(m.role == "system" for m in self.messages)
        return self.first_system if changed else self.system

    def segments(self) -> list[tuple[str | None, list[LoggedMessage]]]:
        """The messages split where the system prompt changed, each with its prompt."""
        out: list[tuple[str | None, list[LoggedMessage]]] = [(self.initial_system, [])]
        for m in self.messages:
            if m.role == "system":
                out.append((m.content or None, []))
            else:
                out[-1][1].append(m)
        return out

    def training_examples(
        self, include_interrupted: bool = False, include_truncated: bool = False
    ) -> list[list[dict[str, str]]]:
        """The conversation as OpenAI-style message lists for training.

        Each reply is kept with the question it answers; a reply that is empty,
        failed, interrupted or cut at the token limit is left out together with
        its question (the flags keep interrupted / length-cut ones). A
        conversation whose system prompt changed part way gives one example per
        system prompt, each with the turns answered under it, so no reply is
        trained under a prompt it was not written for. Examples without a reply
        are left out. An edited reply is its latest edit; alternatives (``/retry``'s
        earlier replies) are not in :attr:`messages` and never trained on.
        """
        out = []
        for system, msgs in self.segments():
            turns = _turn_pairs(msgs, include_interrupted, include_truncated)
            if turns:
                head = [{"role": "system", "content": system}] if system else []
                out.append(head + turns)
        return out


def default_path() -> Path:
    from chatforge.paths import data_dir

    return data_dir() / LOG_FILE


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Version 2 remembers the first system prompt (mid-chat changes become rows)."""
    db.execute("ALTER TABLE conversations ADD COLUMN first_system TEXT")
    db.execute("UPDATE conversations SET first_system = system")


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    """Version 3 keeps judgements: alternative replies (``alt_of``), the served reply's
    id (``response_id``) and the ``judgements`` table. Existing rows are all main line."""
    db.execute("ALTER TABLE messages ADD COLUMN alt_of INTEGER REFERENCES messages(id)")
    db.execute("ALTER TABLE messages ADD COLUMN response_id TEXT")
    for statement in _V3_TABLES:  # not executescript: it would end the migration's transaction
        db.execute(statement)


_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3}
"""From version N to N + 1."""


class ConversationLog(JudgementMethods):
    """The SQLite conversation log (created on first use); its judgement methods
    (:meth:`judge`, :meth:`judgements`, :meth:`set_alternative`, :meth:`promote`) are
    :class:`~chatforge.store.judgement.JudgementMethods`'."""

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
        """Create the tables, or bring an older log up to :data:`SCHEMA_VERSION`
        (in one transaction, so two chatforges starting at once do not both migrate)."""
        version = self._version()
        if version == SCHEMA_VERSION:
            return
        if version is None:  # a new file: the tables (IF NOT EXISTS: safe to race)
            self.db.executescript(_SCHEMA)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = self._version()  # another process may have got here first
            if version is None:
                self.db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            while version is not None and version < SCHEMA_VERSION:
                _MIGRATIONS[version](self.db)
                version += 1
                self.db.execute("UPDATE schema_version SET version = ?", (version,))
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise

    def _version(self) -> int | None:
        """The schema version in the file (None: no tables yet)."""
        has = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        row = self.db.execute("SELECT version FROM schema_version").fetchone() if has else None
        if row is None:
            return None
        if not isinstance(row[0], int):  # a damaged page can read as anything
            raise sqlite3.DatabaseError("database disk image is malformed")
        if row[0] > SCHEMA_VERSION:
            raise ChatforgeError(
                f"the conversation log {self.path} has schema {row[0]}, newer than this "
                f"chatforge understands ({SCHEMA_VERSION}); upgrade chatforge"
            )
        return row[0]

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
        system = system or None
        with self._guard(), self.db:
            cur = self.db.execute(
                "INSERT INTO conversations (created, updated, model, backend, api_base, system, "
                "first_system) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (now, now, model, backend, api_base, system, system),
            )
        return int(cur.lastrowid)

    def set_system(self, cid: int, system: str | None) -> None:
        """Change a conversation's system prompt (None or "": none). Once it has
        messages the change is also recorded where it happened, so `logs show`
        and the training export know which replies were written under which prompt."""
        system = system or None
        now = time.time()
        with self._guard(), self.db:
            row = self.db.execute("SELECT system FROM conversations WHERE id = ?", (cid,))
            found = row.fetchone()
            if found is None:
                raise ChatforgeError(f"no conversation {cid} in the log")
            if found[0] == system:
                return
            if self._has_messages(cid):
                self.db.execute(
                    "INSERT INTO messages (conversation_id, created, role, content) "
                    "VALUES (?, ?, 'system', ?)",
                    (cid, now, system or ""),
                )
            else:
                self.db.execute(
                    "UPDATE conversations SET first_system = ? WHERE id = ?", (system, cid)
                )
            self.db.execute(
                "UPDATE conversations SET system = ?, updated = ? WHERE id = ?",
                (system, now, cid),
            )

    def _has_messages(self, cid: int) -> bool:
        sql = "SELECT 1 FROM messages WHERE conversation_id = ? LIMIT 1"
        return self.db.execute(sql, (cid,)).fetchone() is not None

    def add_message(
        self,
        cid: int,
        role: str,
        content: str,
        *,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        finish_reason: str | None = None,
        seconds: float | None = None,
        first_token_seconds: float | None = None,
        alt_of: int | None = None,
        response_id: str | None = None,
    ) -> int:
        """Append a message and return its id; the keywords are a reply's
        :class:`LoggedMessage` fields (``finish_reason``: "stop", "length",
        "interrupted", "error", ...; ``alt_of``: the main-line reply this one is an
        alternative to)."""
        now = time.time()
        with self._guard(), self.db:
            if alt_of is not None:
                self._check_reply(alt_of, cid, "alt_of")
            cur = self.db.execute(
                "INSERT INTO messages (conversation_id, created, role, content, model, params, "
                "prompt_tokens, completion_tokens, finish_reason, seconds, first_token_seconds, "
                "alt_of, response_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cid,
                    now,
                    role,
                    content,
                    model,
                    json.dumps(params) if params is not None else None,
                    prompt_tokens,
                    completion_tokens,
                    finish_reason,
                    seconds,
                    first_token_seconds,
                    alt_of,
                    response_id,
                ),
            )
            self.db.execute(
                "UPDATE conversations SET updated = ?, model = COALESCE(model, ?) WHERE id = ?",
                (now, model, cid),
            )
        return int(cur.lastrowid)

    def remove(self, cids: list[int]) -> int:
        """Delete these conversations and their messages, all or (when one of them
        is not in the log) none. Deleted text is overwritten, not just unlinked.
        Returns how many were removed."""
        ids = sorted(set(cids))
        with self._guard():
            self.db.execute("PRAGMA secure_delete = ON")
            with self.db:
                missing = [cid for cid in ids if not self._exists(cid)]
                if missing:
                    raise ChatforgeError(
                        f"no conversation {', '.join(map(str, missing))} in the log; nothing "
                        "removed (see `chatforge logs list`)"
                    )
                self.db.executemany("DELETE FROM conversations WHERE id = ?", [(i,) for i in ids])
            self._checkpoint()
        return len(ids)

    def count(self) -> int:
        """How many conversations :meth:`list` has (those with a message)."""
        sql = "SELECT COUNT(DISTINCT conversation_id) FROM messages"
        with self._guard():
            return int(self.db.execute(sql).fetchone()[0])

    def remove_all(self) -> int:
        """Delete every conversation; returns how many :meth:`list` had."""
        with self._guard():
            self.db.execute("PRAGMA secure_delete = ON")
            with self.db:
                n = self.db.execute(
                    "SELECT COUNT(DISTINCT conversation_id) FROM messages"
                ).fetchone()[0]
                self.db.execute("DELETE FROM messages")
                self.db.execute("DELETE FROM conversations")
            self._checkpoint()
        return int(n)

    def _exists(self, cid: int) -> bool:
        sql = "SELECT 1 FROM conversations WHERE id = ?"
        return self.db.execute(sql, (cid,)).fetchone() is not None

    def _checkpoint(self) -> None:
        """Copy the WAL into the file and empty it, so removed text does not linger
        there (best effort: a chat reading the log at the same time may prevent it)."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    # ---------------------------------------------------------------- reading

    _LIST = (
        "SELECT c.id, c.created, c.updated, c.model, c.backend, c.api_base, c.system, "
        "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id AND m.role != 'system' "
        " AND m.alt_of IS NULL), "
        "(SELECT content FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user' "
        " ORDER BY m.id LIMIT 1), "
        "c.first_system, "
        "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user'), "
        "(SELECT COUNT(*) FROM judgements j WHERE j.conversation_id = c.id) "
        "FROM conversations c"
    )

    def _conv(self, row: tuple) -> LoggedConversation:
        preview = " ".join((row[8] or "").split())
        return LoggedConversation(
            *row[:7],
            n_messages=row[7],
            preview=preview[:70] + ("..." if len(preview) > 70 else ""),
            first_system=row[9],
            n_turns=row[10],
            n_judgements=row[11],
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
        by_id: dict[int, LoggedMessage] = {}
        for r in self.db.execute(
            "SELECT role, content, created, model, params, prompt_tokens, completion_tokens, "
            "finish_reason, seconds, first_token_seconds, id, alt_of, response_id FROM messages "
            "WHERE conversation_id = ? ORDER BY id",
            (cid,),
        ):
            params = json.loads(r[4]) if r[4] else None
            by_id[r[10]] = LoggedMessage(r[0], r[1], r[2], r[3], params, *r[5:])
        for m in by_id.values():  # an alternative stands beside its reply, never in history
            main = by_id.get(m.alt_of) if m.alt_of is not None else None
            if main is not None:  # (a later reply: a /retry's earlier one points forward)
                main.alternatives.append(m)
            else:
                conv.messages.append(m)
        for j in self.db.execute(
            "SELECT id, created, conversation_id, message_id, kind, other_id, text, source "
            "FROM judgements WHERE conversation_id = ? ORDER BY id",
            (cid,),
        ):
            if j[3] in by_id:
                by_id[j[3]].judgements.append(Judgement(*j))
        return conv

    def search(self, text: str, limit: int | None = 50) -> list[LoggedConversation]:
        """Conversations with a message (or system prompt) containing ``text`` (any case)."""
        pattern = _like(text)
        sql = (
            self._LIST + " WHERE EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id "
            "AND m.content LIKE ? ESCAPE '\\') OR ((c.system LIKE ? ESCAPE '\\' OR "
            "c.first_system LIKE ? ESCAPE '\\') AND EXISTS "
            "(SELECT 1 FROM messages m WHERE m.conversation_id = c.id)) "
            "ORDER BY c.updated DESC, c.id DESC"
        )
        args: tuple = (pattern, pattern, pattern)
        if limit is not None:
            sql += " LIMIT ?"
            args = (*args, limit)
        with self._guard():
            return [self._conv(r) for r in self.db.execute(sql, args)]

    def search_messages(
        self, text: str, limit: int | None = 50
    ) -> list[tuple[LoggedConversation, list[LoggedMessage]]]:
        """Like :meth:`search`, with the messages that contain ``text`` in each
        conversation (its starting system prompt first, as a "system" message)."""
        found = []
        with self._guard():
            for conv in self.search(text, limit):
                hits = [
                    LoggedMessage(r[0], r[1], r[2])
                    for r in self.db.execute(
                        "SELECT role, content, created FROM messages WHERE conversation_id = ? "
                        "AND content LIKE ? ESCAPE '\\' ORDER BY id",
                        (conv.id, _like(text)),
                    )
                ]
                first = conv.first_system if conv.first_system is not None else conv.system
                if first and text.casefold() in first.casefold():
                    hits.insert(0, LoggedMessage("system", first, conv.created))
                found.append((conv, hits))
        return found

    def conversations(
        self,
        cids: list[int] | None = None,
        model: str | None = None,
        since: float | None = None,
    ) -> Iterator[LoggedConversation]:
        """Every conversation with its messages, oldest first; or only those with
        these ids, with a reply from ``model``, started at or after ``since`` (unix
        time). An id not in the log is an error (before anything is yielded)."""
        where, args = _filters(model, since)
        sql = "SELECT id FROM conversations c" + (" WHERE " + " AND ".join(where) if where else "")
        with self._guard():
            ids = [r[0] for r in self.db.execute(sql + " ORDER BY id", args)]
            if cids:
                missing = sorted({c for c in cids if not self._exists(c)})
                if missing:
                    raise ChatforgeError(
                        f"no conversation {', '.join(map(str, missing))} in the log; "
                        "see `chatforge logs list`"
                    )
                ids = [i for i in ids if i in set(cids)]
        for cid in ids:
            yield self.get(cid)

    def export_training(
        self,
        out: TextIO,
        *,
        include_interrupted: bool = False,
        include_truncated: bool = False,
        cids: list[int] | None = None,
        model: str | None = None,
        since: float | None = None,
        skipped: dict[str, int] | None = None,
        edited: list[int] | None = None,
    ) -> int:
        """Write ``{"messages": [...]}`` JSONL (what ``chatforge train`` reads): one
        line per conversation, or per system prompt of one whose prompt changed
        (see :meth:`LoggedConversation.training_examples`, which also says what is
        left out). Returns the number of lines written; ``skipped`` counts the
        replies left out for being interrupted or length-cut, by finish reason.
        A reply the person edited is written as edited; ``edited`` gets the ids of
        those replies. Alternatives (``/retry``'s earlier replies) are never written."""
        left_out = _left_out(include_interrupted, include_truncated)
        n = 0
        for conv in self.conversations(cids=cids, model=model, since=since):
            if skipped is not None:
                for m in conv.messages:
                    if m.role == "assistant" and m.edit is None and m.finish_reason in left_out:
                        skipped[m.finish_reason] = skipped.get(m.finish_reason, 0) + 1
            for msgs in conv.training_examples(include_interrupted, include_truncated):
                out.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
                n += 1
            if edited is not None:
                edited.extend(
                    m.id
                    for m in conv.messages
                    if m.id is not None
                    and m.edit is not None
                    and _trainable(m, include_interrupted, include_truncated)
                )
        return n

    def export_preference(
        self,
        out: TextIO,
        *,
        cids: list[int] | None = None,
        model: str | None = None,
        since: float | None = None,
    ) -> PreferenceCounts:
        """Write TRL's conversational preference JSONL from the judgements (picks,
        edits, good against bad); see :mod:`chatforge.store.preference`."""
        from chatforge.store.preference import export_preference

        return export_preference(self, out, cids=cids, model=model, since=since)


def _left_out(include_interrupted: bool, include_truncated: bool) -> set[str]:
    """The finish reasons whose replies the training export leaves out."""
    out = set()
    if not include_interrupted:
        out.add(FINISH_INTERRUPTED)
    if not include_truncated:
        out.add(FINISH_LENGTH)
    return out


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` literally anywhere (escape character ``\\``)."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _filters(model: str | None, since: float | None) -> tuple[list[str], tuple]:
    """SQL conditions (on ``conversations c``) and their arguments for the export filters."""
    where: list[str] = []
    args: tuple = ()
    if model is not None:
        where.append(
            "(c.model = ? OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id "
            "AND m.role = 'assistant' AND m.model = ?))"
        )
        args += (model, model)
    if since is not None:
        where.append("c.created >= ?")
        args += (since,)
    return where, args
