"""The conversation log: the store, `chatforge logs`, --continue/--cid/--no-log, export."""

from __future__ import annotations

import io
import json
import sqlite3

import pytest

from chatforge.errors import ChatforgeError
from chatforge.store import ConversationLog
from cli_helpers import run


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_store_roundtrip_search_and_export(tmp_path):
    log = ConversationLog(tmp_path / "log.sqlite3")
    a = log.new_conversation(model="m", system="Be kind.")
    log.add_message(a, "user", "What is 50% of 10?")
    log.add_message(a, "assistant", "5", model="m", prompt_tokens=9, completion_tokens=1)
    log.add_message(a, "user", "unanswered")
    b = log.new_conversation(model="m")
    log.add_message(b, "user", "only a question")
    log.new_conversation()  # empty: never listed
    assert [c.id for c in log.list()] == [b, a]
    conv = log.get(a)
    assert conv.system == "Be kind." and [m.role for m in conv.messages] == [
        "user",
        "assistant",
        "user",
    ]
    assert conv.messages[1].completion_tokens == 1
    assert [c.id for c in log.search("50%")] == [a]  # LIKE wildcards are literal
    assert [c.id for c in log.search("_")] == []
    assert [c.id for c in log.search("KIND")] == [a]  # the system prompt, any case
    out = io.StringIO()
    assert log.export_training(out) == 1  # b has no reply
    row = json.loads(out.getvalue())
    assert row == {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "What is 50% of 10?"},
            {"role": "assistant", "content": "5"},
        ]
    }
    with pytest.raises(ChatforgeError, match="no conversation 99"):
        log.get(99)
    mode = log.db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    log.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "log.sqlite3"
    ConversationLog(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(ChatforgeError, match="upgrade chatforge"):
        ConversationLog(path)


def test_chat_is_logged_continued_and_exported(capsys, data_dir, tiny_llama_dir, tmp_path):
    flags = ["--model", str(tiny_llama_dir), "--temperature", "0", "--max-new-tokens", "4"]
    code, out, err = run(["chat", *flags, "--system", "Be brief."], capsys, "hello\nsecond\n")
    assert code == 0, err
    code, out, err = run(["logs", "list"], capsys)
    header, *rows = out.strip().splitlines()
    assert code == 0
    assert header.split() == ["id", "when", "model", "turns", "judged", "first", "message"]
    assert len(rows) == 1 and "hello" in rows[0] and "\x1b" not in out
    cid = int(rows[0].split()[0])
    assert rows[0].split()[4] == "2"  # turns

    code, out, _ = run(["chat", *flags, "--continue"], capsys, "third\n")
    assert code == 0
    conv = ConversationLog().get(cid)
    assert [m.content for m in conv.messages if m.role == "user"] == ["hello", "second", "third"]
    replies = [m for m in conv.messages if m.role == "assistant"]
    assert all(m.completion_tokens and m.seconds and m.params for m in replies)
    assert replies[2].prompt_tokens > replies[0].prompt_tokens  # the history was sent
    assert replies[0].params["temperature"] == 0.0 and conv.system == "Be brief."

    code, out, _ = run(["logs", "show", str(cid)], capsys)
    assert code == 0 and "system: Be brief." in out and "user: third" in out
    assert "prompt +" in out and "temperature=0.0" in out
    code, out, _ = run(["logs", "search", "SECOND"], capsys)
    assert out.split()[0] == str(cid) and "user: second" in out
    code, out, err = run(["logs", "search", "nowhere-to-be-found"], capsys)
    assert code == 0 and out == "" and "no conversations" in err

    code, _, _ = run(["chat", *flags, "--no-log"], capsys, "unlogged\n")
    assert code == 0
    assert len(ConversationLog().list()) == 1
    code, _, err = run(["chat", *flags, "--cid", "999"], capsys, "x\n")
    assert code == 2 and "no conversation 999" in err
    code, _, err = run(["chat", *flags, "--no-log", "--continue"], capsys, "x\n")
    assert code == 2 and "--no-log" in err

    replies = [m for m in ConversationLog().get(cid).messages if m.role == "assistant"]
    assert all(m.finish_reason in ("stop", "length") for m in replies)
    cut = sum(m.finish_reason == "length" for m in replies)
    target = tmp_path / "train.jsonl"
    code, _, err = run(["logs", "export", "--format", "training", "-o", str(target)], capsys)
    assert code == 0 and (cut == 0 or f"left out {cut} repl" in err)
    argv = ["logs", "export", "--format", "training", "--include-truncated", "-o", str(target)]
    code, _, err = run(argv, capsys)
    assert code == 0 and "exported 1" in err
    row = json.loads(target.read_text())
    assert [m["role"] for m in row["messages"]] == ["system"] + ["user", "assistant"] * 3
    try:
        from chatforge.training.data import load_data
    except ImportError:  # the training package is being written concurrently
        return
    ds = load_data(str(target))
    assert len(ds.conversations) == 1 and len(ds.conversations[0]) == 7
    assert not ds.errors


def test_logs_bad_input(capsys, data_dir):
    code, _, err = run(["logs", "show", "12"], capsys)
    assert code == 2 and "no conversation 12" in err
    code, _, err = run(["logs", "export", "--format", "csv"], capsys)
    assert code == 2 and "unknown export format" in err
    code, _, err = run(["chat", "--continue", "--model", "x"], capsys, "hi\n")
    assert code == 2 and "no logged conversation" in err
