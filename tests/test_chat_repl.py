"""The chat REPL (chatforge.repl): slash commands, stats, Markdown, saving and loading,
interrupted replies, remote API keys."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from rich.console import Console
from rich.markdown import Markdown

from chatforge.chat import Reply, SessionBase, model_messages
from chatforge.conversation import Conversation
from chatforge.errors import ChatforgeError
from chatforge.generation.config import GenerationConfig
from chatforge.remote import resolve_api_key
from chatforge.repl import (
    ChatRepl,
    MarkdownPrinter,
    PlainPrinter,
    format_stats,
    split_blocks,
    use_markdown,
)
from chatforge.store import ConversationLog
from chatforge.transcript import TranscriptWriter, read_transcript
from cli_helpers import run


class FakeSession(SessionBase):
    """Replies "reply N"; records what each request would send the model."""

    model_name = "fake"

    def __init__(self) -> None:
        self.config = GenerationConfig.from_preset("balanced")
        self.conversation = Conversation()
        self.last: Reply | None = None
        self.requests: list[list[dict[str, str]]] = []

    def stream(self, text: str) -> Iterator[str]:
        self.requests.append([m.to_dict() for m in model_messages(self.conversation, text)])
        self.conversation.add_user(text)
        reply = f"reply {len(self.requests)}"
        yield from reply.split(" ")
        self.conversation.add_assistant(reply)
        self.last = Reply(
            reply, "stop", 12, 2, 0.5, config=self.config, cached_tokens=8, first_token_seconds=0.1
        )


def _repl(session=None, **kw) -> tuple[ChatRepl, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    kw.setdefault("interactive", True)
    repl = ChatRepl(session or FakeSession(), Console(file=err, width=200), out=out, **kw)
    return repl, out, err


def _roles(session) -> list[str]:
    return [m.role for m in session.conversation.messages]


# ---------------------------------------------------------------- /set and /params


def test_set_alone_lists_params_with_reply_limit_and_preset():
    repl, _, err = _repl()
    repl.command("/set")
    text = err.getvalue()
    assert "preset = balanced" in text and "(changed" not in text
    assert "max_new_tokens = 256 (default)" in text
    assert "temperature = 0.2" in text and "top_p = 0.9" in text
    err.truncate(0)
    repl.command("/set temperature 0.5")
    repl.command("/params")
    assert "preset = balanced (changed: temperature)" in err.getvalue()
    assert "temperature = 0.5" in err.getvalue()


def test_params_reply_limit_follows_max_new_tokens_and_max_length():
    repl, _, err = _repl()
    repl.command("/set max_new_tokens 40")
    repl.command("/params")
    assert "max_new_tokens = 40" in err.getvalue()
    repl.command("/set max_new_tokens none")
    repl.command("/set max_length 100")
    repl.command("/params")
    assert "max_new_tokens = none (max_length 100 limits prompt + reply)" in err.getvalue()


def test_set_preset_replaces_every_setting():
    repl, _, err = _repl()
    repl.command("/set temperature 0.1")
    repl.command("/set max_new_tokens 7")
    repl.command("/set preset Creative")
    assert repl.session.config == GenerationConfig.from_preset("creative")
    assert repl.session.config.max_new_tokens is None  # nothing kept
    repl.command("/params")
    assert "preset = creative\n" in err.getvalue()
    repl.command("/set preset nope")
    assert "unknown preset 'nope'" in err.getvalue()
    assert repl.session.config == GenerationConfig.from_preset("creative")


# ---------------------------------------------------------------- /retry and /undo


def test_retry_resends_the_last_question_without_the_old_reply():
    repl, out, _ = _repl()
    repl.say("one")
    repl.say("two")
    repl.command("/retry")
    s = repl.session
    assert s.requests[-1] == s.requests[1]  # the same request as the first "two"
    assert [m.content for m in s.conversation.messages] == ["one", "reply 1", "two", "reply 3"]
    assert out.getvalue().splitlines() == ["reply1", "reply2", "reply3"]


def test_undo_removes_the_last_exchange_and_says_when_there_is_none():
    repl, _, err = _repl()
    repl.say("one")
    repl.say("two")
    repl.command("/undo")
    assert [m.content for m in repl.session.conversation.messages] == ["one", "reply 1"]
    repl.say("three")
    assert repl.session.requests[-1][-3:] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "reply 1"},
        {"role": "user", "content": "three"},
    ]
    repl.command("/undo")
    repl.command("/undo")
    assert repl.session.conversation.messages == []
    repl.command("/undo")
    repl.command("/retry")
    assert "nothing to undo" in err.getvalue() and "nothing to retry" in err.getvalue()


def test_commands_fail_loudly_in_a_prompt_file():
    repl, _, _ = _repl(interactive=False)
    with pytest.raises(ChatforgeError, match="nothing to undo"):
        repl.command("/undo")


# ---------------------------------------------------------------- /save and /load


def _chat_with_output_file(path, session=None) -> ChatRepl:
    writer = TranscriptWriter(path)
    repl, _, _ = _repl(session, writer=writer)
    repl.command("/system Be brief.")
    repl.say("one")
    repl.say("two")
    writer.close()
    repl.writer = None
    return repl


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_save_writes_what_output_file_writes(tmp_path, suffix):
    output = tmp_path / f"output{suffix}"
    repl = _chat_with_output_file(output)
    saved = tmp_path / f"saved{suffix}"
    repl.command(f"/save {saved}")
    assert saved.read_text() == output.read_text()
    if suffix == ".jsonl":
        rows = [json.loads(x) for x in saved.read_text().splitlines()]
        assert rows[2]["finish_reason"] == "stop" and rows[2]["cached_tokens"] == 8


def test_save_refuses_to_overwrite_unless_forced(tmp_path):
    repl, _, err = _repl()
    repl.say("one")
    target = tmp_path / "c.jsonl"
    target.write_text("precious\n")
    repl.command(f"/save {target}")
    assert target.read_text() == "precious\n"
    assert f"/save! {target}" in err.getvalue()
    repl.command(f"/save! {target}")
    assert [json.loads(x)["role"] for x in target.read_text().splitlines()] == [
        "user",
        "assistant",
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_load_replaces_the_conversation(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    _chat_with_output_file(path)
    repl, _, err = _repl()
    repl.say("something else")
    repl.command(f"/load {path}")
    s = repl.session
    assert s.system == "Be brief."
    assert [m.content for m in s.conversation.messages] == ["one", "reply 1", "two", "reply 2"]
    repl.say("three")  # the model sees the loaded history
    assert s.requests[-1][0] == {"role": "system", "content": "Be brief."}
    assert s.requests[-1][-2:] == [
        {"role": "assistant", "content": "reply 2"},
        {"role": "user", "content": "three"},
    ]
    assert "loaded 4 messages" in err.getvalue()


def test_load_skips_interrupted_replies_and_reports_bad_files(tmp_path):
    path = tmp_path / "c.txt"
    w = TranscriptWriter(path)
    w.message("user", "Hi\n\nthere")
    w.message("assistant", "Hel", finish_reason="interrupted")
    w.note("new conversation")
    w.message("user", "Hello")
    w.message("assistant", "Line 1\n\nLine 2", finish_reason="length")
    w.close()
    entries = read_transcript(path)
    assert [(e.role, e.content) for e in entries] == [
        ("user", "Hello"),
        ("assistant", "Line 1\n\nLine 2"),
    ]
    assert entries[1].extra["finish_reason"] == "length"
    path2 = tmp_path / "c.jsonl"
    w = TranscriptWriter(path2)
    w.message("user", "Hi")
    w.message("assistant", "Hel", finish_reason="interrupted")
    w.close()
    repl, _, err = _repl()
    repl.command(f"/load {path2}")
    assert _roles(repl.session) == ["user"]  # the partial reply is not sent back
    repl.command(f"/load {tmp_path / 'missing.jsonl'}")
    assert "does not exist" in err.getvalue()
    (tmp_path / "bad.jsonl").write_text('{"role": "robot", "content": "x"}\n')
    repl.command(f"/load {tmp_path / 'bad.jsonl'}")
    assert "line 1 is not a transcript message" in err.getvalue()


# ---------------------------------------------------------------- stats


def test_stats_on_demand_and_after_every_reply():
    repl, _, err = _repl()
    repl.command("/stats")
    assert "no reply yet" in err.getvalue()
    repl.say("one")
    assert "tok/s" not in err.getvalue()
    repl.command("/stats")
    text = err.getvalue()
    assert "reply tokens:        2 (stop)" in text
    assert "reply rate:          4.0 tok/s (after the first token: 2.5 tok/s)" in text
    assert "time to first token: 0.100s" in text
    assert "prompt tokens:       12 (8 cached)" in text
    err.truncate(0)
    err.seek(0)
    repl.command("/stats on")
    repl.say("two")
    assert err.getvalue().count("reply tokens:") == 1
    repl.command("/stats off")
    repl.say("three")
    assert err.getvalue().count("reply tokens:") == 1


def test_verbose_flag_shows_stats(capsys, tiny_llama_dir):
    argv = ["chat", "--model", str(tiny_llama_dir), "-t", "0", "--max-new-tokens", "3"]
    code, out, err = run([*argv, "--verbose", "--no-log"], capsys, "Hello\nAgain\n")
    assert code == 0, err
    assert err.count("time to first token:") == 2 and "cached)" in err
    assert len(out.splitlines()) == 2
    code, out, err = run([*argv, "--plain", "--no-log"], capsys, "Hello\n")
    assert code == 0 and "reply tokens" not in err


# ---------------------------------------------------------------- Markdown


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_markdown_only_in_a_terminal_and_not_plain():
    assert use_markdown(False, _Tty()) is True
    assert use_markdown(True, _Tty()) is False
    assert use_markdown(False, io.StringIO()) is False


LIST_REPLY = "# Title\n\nSome **bold** words.\n\n" + "".join(f"- item {i}\n" for i in range(20))
MIXED_REPLY = (
    "Some **bold** words:\n\n```py\nx = 1\n\ny = 2\n```\n\nA table:\n\n| a | b |\n"
    "|---|---|\n| 1 | 2 |\n\n1. one\n2. two\n\n> a quote\n\n~~~\nraw\n~~~\nend"
)


def test_split_blocks_keeps_code_fences_whole():
    assert split_blocks("a\n\n```\nx\n\ny\n```\n\nb\n") == ["a", "```\nx\n\ny\n```", "b"]
    assert split_blocks("a\n\n") == ["a", ""]  # "a" is done; the next block is empty


@pytest.mark.parametrize("text", [LIST_REPLY, MIXED_REPLY])
def test_markdown_printer_renders_as_it_streams(text):
    emitted: list[str] = []

    class Recording(MarkdownPrinter):
        def _emit(self, line):
            emitted.append(line.plain.rstrip())
            super()._emit(line)

    buf = _Tty()
    printer = Recording(Console(file=buf, force_terminal=True, width=60), fps=1e9)
    for i in range(0, len(text), 3):
        printer.write(text[i : i + 3])
        if i == 150:  # mid-stream, the lines above the live area are already out
            assert "Some bold words" in emitted[0 if text is MIXED_REPLY else 2]
    printer.close()
    # Every line is printed for good exactly once, in order, rendered: what a
    # terminal keeps is the reply rendered once, whatever the live area redrew.
    once = io.StringIO()
    Console(file=once, width=60).print(Markdown(text))
    assert emitted == [x.rstrip() for x in once.getvalue().rstrip("\n").splitlines()]
    shown = buf.getvalue()
    assert "bold" in shown and "**bold**" not in shown and "# Title" not in shown
    plain = io.StringIO()
    p = PlainPrinter(plain)
    p.write("**bold**")
    p.close()
    assert plain.getvalue() == "**bold**\n"


def test_markdown_replies_show_angle_brackets_as_written():
    # Regression: rich reads "<...>" as HTML and drops it: SmolLM2's
    # "<<Caring for Houseplants>>" heading showed as "<>".
    emitted: list[str] = []

    class Recording(MarkdownPrinter):
        def _emit(self, line):
            emitted.append(line.plain.rstrip())
            super()._emit(line)

    printer = Recording(Console(file=_Tty(), force_terminal=True, width=60), fps=1e9)
    printer.write("<<Caring for Houseplants>>\n\nUse a <tag> and **bold** here.\n\n<div>x</div>")
    printer.close()
    assert emitted == [
        "<<Caring for Houseplants>>",
        "",
        "Use a <tag> and bold here.",
        "",
        "<div>x</div>",
    ]


def test_repl_uses_markdown_printer_when_asked():
    repl, out, _ = _repl(markdown=True)
    assert isinstance(repl.printer(), MarkdownPrinter)
    repl.printer().close()
    repl, _, _ = _repl()
    assert isinstance(repl.printer(), PlainPrinter)


# ---------------------------------------------------------------- interrupted replies


def test_interrupted_reply_is_not_sent_back_to_the_model(tiny_llama_dir):
    from chatforge import ChatSession, load_model

    session = ChatSession(load_model(str(tiny_llama_dir)), GenerationConfig(temperature=0))
    session.config = session.config.replace(max_new_tokens=20)
    gen = session.stream("Hi")
    next(gen)
    gen.close()
    assert session.last.finish_reason == "interrupted" and session.last.text
    assert _roles(session) == ["user"]
    sent = model_messages(session.conversation, "More")
    assert [m.to_dict() for m in sent] == [{"role": "user", "content": "Hi\n\nMore"}]
    reply = session.send("More")
    assert reply.finish_reason in ("stop", "length")
    assert _roles(session) == ["user", "user", "assistant"]


def test_keys_are_not_echoed_while_a_markdown_reply_is_drawn():
    # Regression: Ctrl-C during a Markdown reply printed a line twice (3 of 3 tries in
    # tmux): the terminal echoed "^C" into the live area, and the redraw's cursor
    # arithmetic then left a line behind that the final draw printed again.
    import os
    import pty
    import termios

    master, slave = pty.openpty()
    keys = os.fdopen(slave, "r")
    echo_seen: list[bool] = []

    class Interrupting(FakeSession):
        def stream(self, text):
            self.conversation.add_user(text)
            try:
                echo_seen.append(bool(termios.tcgetattr(slave)[3] & termios.ECHO))
                yield "# partial"
                raise KeyboardInterrupt
            finally:
                self.last = Reply("partial", "interrupted", 3, 1, 0.1, config=self.config)

    try:
        assert termios.tcgetattr(slave)[3] & termios.ECHO
        repl, _, _ = _repl(Interrupting(), markdown=True, keys=keys)
        assert repl.say("Hi") is False
        assert echo_seen == [False]  # quiet while the reply was drawn...
        assert termios.tcgetattr(slave)[3] & termios.ECHO  # ...and echoing again after
        # Plain output (a pipe, --plain) leaves the terminal alone.
        echo_seen.clear()
        repl, _, _ = _repl(Interrupting(), markdown=False, keys=keys)
        repl.say("Hi")
        assert echo_seen == [True]
    finally:
        keys.close()
        os.close(master)


def test_an_interrupted_reply_keeps_its_time_to_first_token(tiny_llama_dir):
    # Regression: /stats after Ctrl-C said "time to first token: -" though tokens came.
    from chatforge import ChatSession, load_model

    session = ChatSession(load_model(str(tiny_llama_dir)), GenerationConfig(temperature=0))
    session.config = session.config.replace(max_new_tokens=20)
    gen = session.stream("Hi")
    next(gen)
    next(gen)
    gen.close()
    last = session.last
    assert last.finish_reason == "interrupted" and last.completion_tokens >= 1
    assert last.first_token_seconds is not None
    assert 0 < last.first_token_seconds <= last.seconds
    assert "time to first token: -" not in "\n".join(format_stats(last))


def test_ctrl_c_in_the_repl_shows_the_reply_but_keeps_it_from_the_model():
    class Interrupting(FakeSession):
        def stream(self, text):
            self.conversation.add_user(text)
            try:
                yield "partial"
                raise KeyboardInterrupt
            finally:
                self.last = Reply("partial", "interrupted", 3, 1, 0.1, config=self.config)

    repl, out, err = _repl(Interrupting())
    assert repl.say("Hi") is False
    assert out.getvalue() == "partial\n"
    assert "reply stopped" in err.getvalue()
    assert _roles(repl.session) == ["user"]


# ---------------------------------------------------------------- the log


def test_system_undo_and_load_reach_the_log_for_continue(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    from chatforge.store import LoggedSession

    log = ConversationLog()
    repl, _, _ = _repl(LoggedSession(FakeSession(), log, "fake"))
    repl.say("one")
    repl.command("/system Be terse.")
    assert log.latest().system == "Be terse."
    repl.say("two")
    repl.command("/undo")
    conv = log.latest()
    assert conv.system == "Be terse."
    assert [m.content for m in conv.messages] == ["one", "reply 1"]
    repl.command("/retry")
    conv = log.latest()
    assert [m.content for m in conv.messages] == ["one", "reply 3"]
    assert conv.messages[-1].finish_reason == "stop"


def test_system_change_is_restored_by_continue(capsys, tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    argv = ["chat", "--model", str(tiny_llama_dir), "-t", "0", "--max-new-tokens", "3"]
    code, _, err = run(argv, capsys, "Hello\n/system Be terse.\n")
    assert code == 0, err
    code, _, err = run([*argv, "--continue"], capsys, "/history\n")
    assert code == 0, err
    assert "system: Be terse." in err


# ---------------------------------------------------------------- remote API keys


def test_api_key_precedence():
    env = {"CHATFORGE_API_KEY": "env-key", "MINE": "mine-key", "OPENAI_API_KEY": "oa"}
    assert resolve_api_key("flag-key", "MINE", env) == ("flag-key", "--api-key")
    assert resolve_api_key(None, "MINE", env) == ("mine-key", "$MINE (--api-key-env)")
    assert resolve_api_key(None, None, env) == ("env-key", "$CHATFORGE_API_KEY")
    assert resolve_api_key(None, None, {"OPENAI_API_KEY": "oa"}) == ("oa", "$OPENAI_API_KEY")
    assert resolve_api_key(None, None, {}) == (None, None)
    with pytest.raises(ChatforgeError, match="NOPE is not set"):
        resolve_api_key(None, "NOPE", env)


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_dir):
    from chatforge import load_model
    from chatforge.server import create_app
    from serverkit import ServerThread

    app = create_app(load_model(str(tiny_llama_dir)), model_id="tiny", api_key="sekret")
    with ServerThread(app) as srv:
        yield srv


def test_401_names_where_the_key_came_from(keyed_server, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("CHATFORGE_API_KEY", raising=False)
    argv = ["chat", "--api-base", keyed_server.url + "/v1", "--model", "tiny"]
    code, _, err = run(argv, capsys, "hi\n")
    assert code == 2 and "401" in err and "no API key was given" in err
    assert "CHATFORGE_API_KEY" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("CHATFORGE_API_KEY", "wrong")
    code, _, err = run(argv, capsys, "hi\n")
    assert code == 2 and "the API key came from $CHATFORGE_API_KEY" in err
    code, _, err = run([*argv, "--api-key", "also-wrong"], capsys, "hi\n")
    assert code == 2 and "the API key came from --api-key" in err
    code, out, err = run([*argv, "--api-key", "sekret", "--max-new-tokens", "2"], capsys, "hi\n")
    assert code == 0, err
    monkeypatch.setenv("CHATFORGE_API_KEY", "sekret")
    code, out, err = run([*argv, "--max-new-tokens", "2"], capsys, "hi\n")
    assert code == 0, err


def test_continue_leaves_out_interrupted_replies(capsys, tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    log = ConversationLog()
    cid = log.new_conversation(model="tiny")
    log.add_message(cid, "user", "Hi")
    log.add_message(cid, "assistant", "Hel-partial", finish_reason="interrupted")
    log.add_message(cid, "user", "More")
    log.add_message(cid, "assistant", "Fine.", finish_reason="stop")
    log.close()
    argv = ["chat", "--model", str(tiny_llama_dir), "--continue"]
    code, _, err = run(argv, capsys, "/history\n")
    assert code == 0, err
    assert "Hel-partial" not in err
    assert "user: Hi" in err and "user: More" in err and "assistant: Fine." in err
