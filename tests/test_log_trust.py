"""The conversation log as data a user can trust: finish reasons, what the training
export leaves out and its filters, system prompt changes, `logs rm`, and `logs list` /
`logs search` on a terminal and through a pipe."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime

import pytest

from chatforge.store import ConversationLog, LoggedSession
from chatforge.store.log import SCHEMA_VERSION
from cli_helpers import run


@pytest.fixture()
def log(tmp_path, monkeypatch):
    """The log `chatforge logs` opens, empty."""
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    opened = ConversationLog()
    yield opened
    opened.close()


def _exchange(log, cid, question, answer, finish="stop", model="m"):
    log.add_message(cid, "user", question)
    log.add_message(cid, "assistant", answer, model=model, finish_reason=finish)


def _export(capsys, *flags) -> tuple[int, list[dict], str]:
    """(exit code, the JSONL rows, stderr) of `logs export` to stdout."""
    code, out, err = run(["logs", "export", *flags], capsys)
    return code, [json.loads(line) for line in out.splitlines()], err


def _texts(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"]]


# ---------------------------------------------------------------- finish reasons


def test_finish_reason_is_stored_and_shown(log, capsys):
    cid = log.new_conversation(model="m")
    _exchange(log, cid, "q1", "complete", "stop")
    _exchange(log, cid, "q2", "half a rep", "interrupted")
    assert [m.finish_reason for m in log.get(cid).messages] == [None, "stop", None, "interrupted"]
    code, out, _ = run(["logs", "show", str(cid)], capsys)
    assert code == 0 and "[m; stop]" in out and "[m; interrupted]" in out


def _v1_log(path) -> None:
    """A log as chatforge wrote it before schema 2."""
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE conversations (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
            updated REAL NOT NULL, model TEXT, backend TEXT NOT NULL, api_base TEXT, system TEXT);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            created REAL NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, model TEXT,
            params TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, finish_reason TEXT,
            seconds REAL, first_token_seconds REAL);
        INSERT INTO conversations VALUES (1, 1.0, 2.0, 'old', 'local', NULL, 'Be old.');
        INSERT INTO messages (conversation_id, created, role, content, model)
            VALUES (1, 1.0, 'user', 'hi', NULL), (1, 2.0, 'assistant', 'hello', 'old');
        """
    )
    db.commit()
    db.close()


def test_an_older_log_is_migrated_and_unknown_finish_reasons_are_kept(log, capsys):
    path = log.path
    log.close()
    path.unlink()
    _v1_log(path)
    migrated = ConversationLog(path)
    version = migrated.db.execute("SELECT version FROM schema_version").fetchone()[0]
    assert version == SCHEMA_VERSION  # 1 -> 2 -> 3 (judgements)
    conv = migrated.get(1)
    assert conv.initial_system == "Be old." and conv.messages[1].finish_reason is None
    migrated.set_system(1, "Be new.")  # recorded now that the table can
    migrated.close()
    code, out, _ = run(["logs", "show", "1"], capsys)
    assert "finish reason not recorded" in out and "system: Be old." in out
    assert "system (changed): Be new." in out
    code, rows, _ = _export(capsys)  # unknown is not a reason to drop a reply
    assert code == 0 and _texts(rows[0]) == ["Be old.", "hi", "hello"]


def test_interrupted_reply_is_logged_as_interrupted():
    """Closing the stream part way (Ctrl-C, the caller stopping) logs what was said."""

    class Session:
        system = None
        last = None

        def __init__(self):
            self.conversation = type("C", (), {"messages": []})()

        def stream(self, text):
            parts = []
            try:
                for word in ("one ", "two ", "three"):
                    parts.append(word)
                    yield word
                self.last = _reply("".join(parts), "stop")
            finally:
                if self.last is None:
                    self.last = _reply("".join(parts), "interrupted")

    logged = LoggedSession(Session(), ConversationLog(":memory:"), "m")
    stream = logged.stream("count")
    assert next(stream) == "one "
    stream.close()
    conv = logged.log.get(logged.cid)
    assert [(m.role, m.content, m.finish_reason) for m in conv.messages] == [
        ("user", "count", None),
        ("assistant", "one ", "interrupted"),
    ]


def _reply(text, finish):
    from chatforge.chat import Reply
    from chatforge.generation.config import GenerationConfig

    return Reply(
        text=text,
        finish_reason=finish,
        prompt_tokens=1,
        completion_tokens=1,
        seconds=0.1,
        dropped=0,
        config=GenerationConfig(),
    )


# ---------------------------------------------------------------- training export


def test_export_leaves_out_cut_replies_with_their_question_unless_asked(log, capsys):
    cid = log.new_conversation(model="m", system="S")
    _exchange(log, cid, "q1", "a1", "stop")
    _exchange(log, cid, "q2", "a2 was interr", "interrupted")
    _exchange(log, cid, "q3", "a3 ran out of", "length")
    _exchange(log, cid, "q4", "a4", None)  # from before finish reasons were logged
    _exchange(log, cid, "q5", "", "stop")  # empty: never
    _exchange(log, cid, "q6", "boom", "error")  # failed: never
    code, rows, err = _export(capsys)
    assert code == 0 and [_texts(r) for r in rows] == [["S", "q1", "a1", "q4", "a4"]]
    assert "left out 1 interrupted reply (--include-interrupted" in err
    assert "and 1 reply cut at the token limit (--include-truncated keeps them)" in err
    _, rows, err = _export(capsys, "--include-interrupted")
    assert _texts(rows[0]) == ["S", "q1", "a1", "q2", "a2 was interr", "q4", "a4"]
    assert "interrupted" not in err
    _, rows, _ = _export(capsys, "--include-interrupted", "--include-truncated")
    assert _texts(rows[0])[5:7] == ["q3", "a3 ran out of"] and len(rows[0]["messages"]) == 9


def test_export_of_only_cut_replies_writes_nothing(log, capsys):
    cid = log.new_conversation(model="m")
    _exchange(log, cid, "q", "cut", "interrupted")
    code, rows, err = _export(capsys)
    assert code == 0 and rows == [] and "exported 0 conversations" in err


def test_export_filters_model_since_and_cid(log, capsys, monkeypatch):
    days = {}
    for day, model in (("2026-01-01", "a"), ("2026-02-01", "b"), ("2026-03-01", "a")):
        when = datetime.fromisoformat(day + "T12:00").timestamp()
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda when=when: when)
            days[day] = log.new_conversation(model=model)
            _exchange(log, days[day], f"q {day}", f"a {day}", model=model)

    def questions(*flags):
        code, rows, err = _export(capsys, *flags)
        assert code == 0, err
        return [r["messages"][0]["content"] for r in rows]

    assert questions("--model", "a") == ["q 2026-01-01", "q 2026-03-01"]
    assert questions("--since", "2026-02-01") == ["q 2026-02-01", "q 2026-03-01"]
    assert questions("--since", "2026-02-01T13:00") == ["q 2026-03-01"]
    assert questions("--since", "2026-02-01 11:00", "--model", "b") == ["q 2026-02-01"]
    first, last = days["2026-01-01"], days["2026-03-01"]
    assert questions("--cid", str(last), "--cid", str(first)) == ["q 2026-01-01", "q 2026-03-01"]
    assert questions("--model", "nobody") == []


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "01/02/2026", ""])
def test_export_bad_since_is_a_clear_error(log, capsys, bad):
    code, _, err = run(["logs", "export", "--since", bad], capsys)
    assert code == 2 and f"--since {bad!r} is not a date" in err and "YYYY-MM-DD" in err


def test_export_unknown_cid_is_an_error_and_writes_no_file(log, capsys, tmp_path):
    cid = log.new_conversation(model="m")
    _exchange(log, cid, "q", "a")
    target = tmp_path / "out.jsonl"
    code, _, err = run(
        ["logs", "export", "--cid", str(cid), "--cid", "77", "-o", str(target)], capsys
    )
    assert code == 2 and "no conversation 77" in err and not target.exists()


# ---------------------------------------------------------------- system prompt changes


def test_a_system_change_is_recorded_where_it_happened(log, capsys):
    cid = log.new_conversation(model="m", system="Be brief.")
    log.set_system(cid, "Not even this.")  # before any message: just the start prompt
    _exchange(log, cid, "q1", "a1")
    log.set_system(cid, "Not even this.")  # unchanged: nothing recorded
    log.set_system(cid, "Be verbose.")
    _exchange(log, cid, "q2", "a2")
    log.set_system(cid, None)
    _exchange(log, cid, "q3", "a3")
    conv = log.get(cid)
    assert conv.initial_system == "Not even this." and conv.system is None  # latest
    assert [m.role for m in conv.messages].count("system") == 2
    assert conv.n_messages == 6 and conv.n_turns == 3

    code, out, _ = run(["logs", "show", str(cid)], capsys)
    order = ["system: Not even this.", "a1", "system (changed): Be verbose.", "a2"]
    order += ["system (removed)", "a3"]
    assert code == 0 and [out.index(s) for s in order] == sorted(out.index(s) for s in order)

    code, rows, _ = _export(capsys)  # each reply with the prompt it was written under
    assert [_texts(r) for r in rows] == [
        ["Not even this.", "q1", "a1"],
        ["Be verbose.", "q2", "a2"],
        ["q3", "a3"],
    ]


def test_continue_restores_the_latest_system_prompt_and_the_history_the_model_saw(log):
    cid = log.new_conversation(model="m", system="First.")
    _exchange(log, cid, "q1", "a1")
    log.set_system(cid, "Second.")
    _exchange(log, cid, "q2", "a2 cut sh", "interrupted")
    _exchange(log, cid, "q3", "a3", "length")

    class Session:
        system = None

        def __init__(self):
            self.conversation = type("C", (), {"messages": []})()

        def reset(self):
            self.conversation.messages = []

    session = Session()
    logged = LoggedSession(session, log, "m")
    logged.resume(log.get(cid))
    assert session.system == "Second." and logged.cid == cid
    assert [m.content for m in session.conversation.messages] == ["q1", "a1", "q2", "q3", "a3"]
    logged.system = "Third."  # /system in the continued chat is logged
    conv = log.get(cid)
    assert conv.system == "Third." and conv.messages[-1].content == "Third."


# ---------------------------------------------------------------- rm


def _three(log) -> list[int]:
    ids = []
    for q in ("one", "two", "three"):
        ids.append(log.new_conversation(model="m"))
        _exchange(log, ids[-1], q, "answer")
    return ids


def test_rm_removes_the_conversations_and_their_messages(log, capsys):
    a, b, c = _three(log)
    code, _, err = run(["logs", "rm", str(a), str(c)], capsys)
    assert code == 0 and "removed 2 conversations" in err
    assert [x.id for x in log.list()] == [b]
    assert log.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2


def test_rm_with_an_unknown_id_removes_nothing(log, capsys):
    a, b, c = _three(log)
    code, _, err = run(["logs", "rm", str(a), "42", str(b)], capsys)
    assert code == 2 and "no conversation 42" in err and "nothing removed" in err
    assert len(log.list()) == 3


@pytest.mark.parametrize("argv", [["logs", "rm"], ["logs", "rm", "1", "--all"]])
def test_rm_needs_ids_or_all(log, capsys, argv):
    code, _, err = run(argv, capsys)
    assert code == 2 and "--all" in err


def test_rm_all_asks_first(log, capsys):
    _three(log)
    code, out, err = run(["logs", "rm", "--all"], capsys, "n\n")
    assert f"Remove all 3 conversations from {log.path}?" in out + err
    assert code == 2 and "nothing removed" in err and "--yes" in err and len(log.list()) == 3
    code, _, err = run(["logs", "rm", "--all"], capsys, "")  # no answer: no
    assert code == 2 and "nothing removed" in err and len(log.list()) == 3
    code, _, err = run(["logs", "rm", "--all"], capsys, "y\n")
    assert code == 0 and "removed 3 conversations" in err and log.list() == []
    _three(log)
    code, _, err = run(["logs", "rm", "--all", "--yes"], capsys)
    assert code == 0 and log.list() == []


def test_removed_text_does_not_stay_in_the_file(log, capsys):
    cid = log.new_conversation(model="m")
    _exchange(log, cid, "my secret passphrase", "noted")
    log.close()
    code, _, _ = run(["logs", "rm", str(cid)], capsys)
    assert code == 0
    for f in log.path.parent.glob("conversations.sqlite3*"):
        assert b"secret passphrase" not in f.read_bytes(), f


# ---------------------------------------------------------------- list and search


@pytest.fixture()
def terminal(monkeypatch):
    """`chatforge logs` output as a colour terminal shows it (rich's own switches:
    FORCE_COLOR makes stdout a terminal, COLUMNS its width)."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "150")
    monkeypatch.delenv("NO_COLOR", raising=False)


def test_list_has_headers_and_keeps_brackets_through_a_pipe(log, capsys):
    cid = log.new_conversation(model="m", backend="remote", api_base="http://h/v1")
    _exchange(log, cid, "what does [bold]x[/bold] do?\x1b[31m", "it is markup")
    code, out, _ = run(["logs", "list"], capsys)
    header, row = out.splitlines()
    assert header.split()[:4] == ["id", "when", "model", "turns"] and "first message" in header
    assert "[bold]x[/bold]" in row and "m @ http://h/v1" in row and "\x1b" not in out
    assert row.split()[0] == str(cid)


def test_list_on_a_terminal_is_a_table(log, capsys, terminal):
    cid = log.new_conversation(model="m")
    _exchange(log, cid, "what does [bold]x[/bold] do?", "it is markup")
    code, shown, _ = run(["logs", "list"], capsys)
    assert code == 0 and "first message" in shown and "[bold]x[/bold]" in shown


def test_search_shows_the_matching_text(log, capsys):
    cid = log.new_conversation(model="m", system="You know PARIS well.")
    log.add_message(cid, "user", "Tell me about France.")
    log.add_message(
        cid, "assistant", "x" * 200 + " The capital is Paris, on the\nSeine. " + "y" * 200
    )
    other = log.new_conversation(model="m")
    _exchange(log, other, "nothing here", "nor here")
    code, out, _ = run(["logs", "search", "paris"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[0] == str(cid) and str(other) not in out.split()
    assert "    system: You know PARIS well." in lines
    reply = next(line for line in lines if line.startswith("    assistant:"))
    assert "...xxx" in reply and "The capital is Paris, on the Seine." in reply
    assert reply.endswith("yyy...") and "\x1b" not in out


def test_search_counts_more_matches_than_it_shows(log, capsys):
    cid = log.new_conversation(model="m")
    _exchange(log, cid, "echo echo echo echo echo", "ok")
    code, out, _ = run(["logs", "search", "ECHO"], capsys)
    assert code == 0 and out.count("    user:") == 3 and "(+2 more)" in out


def test_search_on_a_terminal_highlights_the_match(log, capsys, terminal):
    cid = log.new_conversation(model="m")
    _exchange(log, cid, "where is [red]Paris[/red]?", "France")
    code, shown, _ = run(["logs", "search", "paris"], capsys)
    assert code == 0 and "[red]" in shown  # markup in a message is text
    at = shown.index("Paris")
    assert shown[:at].endswith("m") and "\x1b[" in shown[at - 12 : at]  # styled
