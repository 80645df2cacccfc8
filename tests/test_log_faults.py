"""A damaged or full conversation log: one line naming the file and the way out, no traceback."""

from __future__ import annotations

import io
import sqlite3

import pytest

from chatforge.cli.app import main
from chatforge.store import ConversationLog
from chatforge.store.log import LogError
from cli_helpers import run


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def _one_line(code: int, err: str) -> str:
    assert code != 0, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _garbage(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(256)) * 64)  # overwritten with something else


def _damage_pages(path) -> None:
    """A real log whose header is intact but whose table pages are not."""
    log = ConversationLog(path)
    cid = log.new_conversation(model="m")
    for i in range(200):
        log.add_message(cid, "user", f"message {i} " + "x" * 400)
    log.close()
    data = bytearray(path.read_bytes())
    for page in range(4096, len(data), 4096):
        data[page : page + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))


FLAGS = ["--temperature", "0", "--max-new-tokens", "3"]


@pytest.mark.parametrize("damage", [_garbage, _damage_pages])
@pytest.mark.parametrize(
    "argv",
    [
        ["logs", "list"],
        ["logs", "show", "1"],
        ["logs", "search", "message"],
        ["logs", "export"],
        ["logs", "export", "-o", "{tmp}/out.jsonl"],
        ["logs", "export", "--model", "m", "--since", "2020-01-01", "--cid", "1"],
        ["logs", "rm", "1"],
        ["logs", "rm", "--all", "--yes"],
        ["chat", "--model", "{model}", *FLAGS],
        ["chat", "--model", "{model}", "--continue", *FLAGS],
        ["chat", "--model", "{model}", "--cid", "1", *FLAGS],
    ],
)
def test_damaged_log_is_one_line_naming_the_file_and_the_way_out(
    argv, damage, data_dir, tmp_path, capsys, tiny_llama_dir
):
    path = data_dir / "conversations.sqlite3"
    damage(path)
    before = path.read_bytes()
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_llama_dir)) for a in argv]
    code, _, err = run(argv, capsys, "hello\n")
    _one_line(code, err)
    assert f"the conversation log {path} is damaged" in err
    assert "--no-log" in err and f"mv {path} {path}.bad" in err and ".recover" in err
    assert path.read_bytes() == before  # nothing written to it
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.tmp").exists()


def test_the_way_out_works(data_dir, capsys, tiny_llama_dir):
    path = data_dir / "conversations.sqlite3"
    _garbage(path)
    code, _, err = run(["chat", "--model", str(tiny_llama_dir), "--no-log", *FLAGS], capsys, "hi\n")
    assert code == 0, err
    path.rename(path.with_name(path.name + ".bad"))
    code, _, err = run(["chat", "--model", str(tiny_llama_dir), *FLAGS], capsys, "hi\n")
    assert code == 0, err
    assert len(ConversationLog(path).list()) == 1


def _disk_full_on_insert(monkeypatch) -> None:
    """Every write to the log fails as SQLite does when the disk is full."""
    real = ConversationLog.add_message

    def add_message(self, *args, **kwargs):
        # A trigger makes SQLite itself raise inside the real transaction.
        self.db.execute(
            "CREATE TEMP TRIGGER IF NOT EXISTS full BEFORE INSERT ON messages "
            "BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END"
        )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ConversationLog, "add_message", add_message)


def test_disk_full_log_is_one_line_and_stops_the_chat(
    data_dir, capsys, monkeypatch, tiny_llama_dir
):
    _disk_full_on_insert(monkeypatch)
    argv = ["chat", "--model", str(tiny_llama_dir), *FLAGS]
    code, _, err = run(argv, capsys, "first\nsecond\n")
    _one_line(code, err)
    assert "the disk is full" in err and "--no-log" in err
    assert str(data_dir / "conversations.sqlite3") in err


def test_disk_full_stops_an_interactive_chat_too(data_dir, capsys, monkeypatch, tiny_llama_dir):
    """The interactive loop prints other errors and goes on; a failing log ends it."""
    from chatforge import repl
    from chatforge.cli import chat as chat_cli

    _disk_full_on_insert(monkeypatch)
    said = []

    def fake_say(self, text):
        said.append(text)
        for _ in self.session.stream(text):
            pass
        return True

    inputs = iter(["first", "second"])
    monkeypatch.setattr(repl.ChatRepl, "say", fake_say)
    monkeypatch.setattr(repl, "read_input", lambda prompt: next(inputs))
    monkeypatch.setattr(repl, "_prompt_session", lambda: None)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(chat_cli.sys, "stdin", Terminal())
    code = main(["chat", "--model", str(tiny_llama_dir), *FLAGS])
    err = capsys.readouterr().err
    assert said == ["first"]  # stopped at the first failing turn
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: cannot write the conversation log")


def test_sqlite_full_error_code_is_recognised(tmp_path):
    log = ConversationLog(tmp_path / "log.sqlite3")
    e = sqlite3.OperationalError("database or disk is full")
    with pytest.raises(LogError, match="the disk is full"), log._guard():
        raise e
    with pytest.raises(LogError, match="is damaged"), log._guard():
        raise sqlite3.DatabaseError("database disk image is malformed")
    log.close()
