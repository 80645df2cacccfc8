"""Judgements as data (issue 27): the v3 log (alternatives, judgements), the chat's
/good /bad /edit /retry /pick, POST /v1/feedback, `logs list/show`, and the
preference and training exports. No model is needed except for the route."""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from chatforge.chat import Reply, SessionBase, model_messages
from chatforge.conversation import Conversation
from chatforge.errors import ChatforgeError
from chatforge.generation.config import GenerationConfig
from chatforge.repl import ChatRepl
from chatforge.server.state import get_state
from chatforge.store import ConversationLog, LoggedSession
from chatforge.store import preference as pref
from chatforge.store.log import SCHEMA_VERSION
from cli_helpers import run

V2_DUMP = Path(__file__).parent / "fixtures" / "log_v2.sql"


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _export(log: ConversationLog, how: str = "export_training", **kw) -> tuple[list, object]:
    out = io.StringIO()
    result = getattr(log, how)(out, **kw)
    return [json.loads(line) for line in out.getvalue().splitlines()], result


# ---------------------------------------------------------------- the schema


def test_a_v2_log_is_migrated_with_its_data(tmp_path):
    """tests/fixtures/log_v2.sql was written by chatforge's v2 code (ConversationLog)."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(V2_DUMP.read_text())
    db.close()
    log = ConversationLog(path)
    assert log.db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    columns = {r[1] for r in log.db.execute("PRAGMA table_info(messages)")}
    assert {"alt_of", "response_id"} <= columns
    rows, n = _export(log)
    assert n == 3 and rows == [  # as the v2 code exported it
        {
            "messages": [
                _msg("system", "be brief"),
                _msg("user", "hi"),
                _msg("assistant", "hello there"),
            ]
        },
        {"messages": [_msg("system", "be long"), _msg("user", "again"), _msg("assistant", "sure")]},
        {"messages": [_msg("user", "q"), _msg("assistant", "a")]},
    ]
    conv = log.get(1)
    assert [m.content for m in conv.messages][:2] == ["hi", "hello there"]
    first = conv.messages[1]
    assert first.params == {"temperature": 0.7} and first.completion_tokens == 2
    assert first.id == 2 and first.alt_of is None and first.judgements == []
    assert [(c.id, c.n_messages, c.n_judgements) for c in log.list()] == [(2, 2, 0), (1, 6, 0)]
    log.judge(first.id, "good")  # and the new table works on old rows
    assert log.get(1).messages[1].verdict == "good"
    log.close()
    ConversationLog(path).close()  # opening it again migrates nothing


def test_judge_checks_what_it_is_given(tmp_path):
    log = ConversationLog(tmp_path / "log.sqlite3")
    cid = log.new_conversation(model="m")
    q = log.add_message(cid, "user", "q")
    a = log.add_message(cid, "assistant", "a", model="m")
    other = log.new_conversation(model="m")
    log.add_message(other, "user", "q")
    b = log.add_message(other, "assistant", "b", model="m")
    bad = [
        (dict(message_id=a, kind="meh"), "unknown judgement 'meh'"),
        (dict(message_id=a, kind="pick"), "a pick needs the reply that was not chosen"),
        (dict(message_id=a, kind="edit", text="  "), "an edit needs the new text"),
        (dict(message_id=a, kind="good", text="x"), "only an edit has text"),
        (dict(message_id=q, kind="good"), f"message {q} is a user message, not a reply"),
        (dict(message_id=999, kind="good"), "no message 999 in the log"),
        (dict(message_id=a, kind="pick", other_id=b), f"is in conversation {other}, not {cid}"),
        (dict(message_id=a, kind="good", source="fax"), "unknown judgement source 'fax'"),
    ]
    for kw, message in bad:
        with pytest.raises(ChatforgeError, match=message):
            log.judge(**kw)
    assert log.judgements(cid) == []
    jid = log.judge(a, "edit", text="better")
    assert [(j.id, j.kind, j.text, j.source) for j in log.judgements(cid)] == [
        (jid, "edit", "better", "chat")
    ]
    log.remove([cid])  # judgements go with their conversation
    assert log.db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0] == 0


def test_alternatives_stand_beside_their_reply_and_never_become_history(tmp_path):
    log = ConversationLog(tmp_path / "log.sqlite3")
    cid = log.new_conversation(model="m")
    log.add_message(cid, "user", "q")
    a1 = log.add_message(cid, "assistant", "one", model="m")
    a2 = log.add_message(cid, "assistant", "two", model="m")
    log.set_alternative(a1, a2)
    a3 = log.add_message(cid, "assistant", "three", model="m")
    log.set_alternative(a2, a3)  # a2 and its alternative a1 now stand beside a3
    conv = log.get(cid)
    assert [m.content for m in conv.messages] == ["q", "three"]
    assert [m.content for m in conv.messages[1].alternatives] == ["one", "two"]
    assert conv.n_messages == 2 and conv.n_turns == 1
    log.promote(a1)
    conv = log.get(cid)
    assert [m.content for m in conv.messages] == ["q", "one"]
    assert [m.id for m in conv.messages[1].alternatives] == [a2, a3]
    rows, _ = _export(log)
    assert rows == [{"messages": [_msg("user", "q"), _msg("assistant", "one")]}]


# ---------------------------------------------------------------- the chat REPL


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
        yield reply
        self.conversation.add_assistant(reply)
        self.last = Reply(reply, "stop", 12, 2, 0.5, config=self.config)


def _repl(log: ConversationLog | None, interactive: bool = True) -> tuple[ChatRepl, io.StringIO]:
    err = io.StringIO()
    session = LoggedSession(FakeSession(), log, "fake") if log else FakeSession()
    repl = ChatRepl(
        session, Console(file=err, width=200), out=io.StringIO(), interactive=interactive
    )
    return repl, err


def _said(err: io.StringIO) -> str:
    text = err.getvalue()
    err.truncate(0)
    err.seek(0)
    return " ".join(text.split())


def test_good_bad_and_edit_are_logged_and_the_edit_becomes_history(tmp_path):
    log = ConversationLog(tmp_path / "log.sqlite3")
    repl, err = _repl(log)
    repl.command("/good")
    assert "no reply to judge yet" in _said(err)
    repl.say("one")
    repl.command("/good")
    assert "(marked the last reply good)" in _said(err)
    repl.command("/bad")  # changed my mind: the latest counts
    repl.command("/edit My own answer.")
    assert "edited the last reply; the conversation goes on from your text" in _said(err)
    repl.say("two")
    assert repl.session.requests[-1] == [
        _msg("user", "one"),
        _msg("assistant", "My own answer."),
        _msg("user", "two"),
    ]
    conv = log.latest()
    reply = conv.messages[1]
    assert reply.content == "reply 1" and reply.final_text == "My own answer."
    assert [j.kind for j in reply.judgements] == ["good", "bad", "edit"]
    assert reply.verdict == "bad" and reply.model == "fake" and reply.params is not None
    assert conv.n_judgements == 3
    # --continue goes on from the edit, as the live chat did
    resumed = LoggedSession(FakeSession(), log, "fake")
    resumed.resume(log.get(conv.id))
    assert [m.content for m in resumed.conversation.messages][:2] == ["one", "My own answer."]
    assert resumed.reply_id == conv.messages[3].id
    rows, _ = _export(log)
    assert [m["content"] for m in rows[0]["messages"]] == [
        "one",
        "My own answer.",
        "two",
        "reply 2",
    ]


def test_retry_keeps_the_earlier_reply_and_pick_chooses_between_them(tmp_path):
    log = ConversationLog(tmp_path / "log.sqlite3")
    repl, err = _repl(log)
    repl.say("q")
    repl.command("/pick 1")
    assert "nothing to pick from: /retry gives the last question another reply" in _said(err)
    repl.command("/retry")
    conv = log.latest()
    assert [m.content for m in conv.messages] == ["q", "reply 2"]
    assert [m.content for m in conv.messages[1].alternatives] == ["reply 1"]
    assert log.db.execute("SELECT COUNT(*) FROM messages WHERE role = 'user'").fetchone()[0] == 1
    repl.command("/pick 3")
    assert "/pick takes a reply number from 1 to 2 (1 = the first)" in _said(err)
    repl.command("/pick 1")
    assert "picked reply 1 of 2; the conversation goes on from it" in _said(err)
    assert repl.session.conversation.messages[-1].content == "reply 1"
    repl.command("/retry")  # a third try stands beside the two
    repl.command("/pick 1")
    assert "picked reply 1 of 3" in _said(err)
    repl.say("next")
    assert repl.session.requests[-1][1] == _msg("assistant", "reply 1")
    conv = log.latest()
    assert [m.content for m in conv.messages] == ["q", "reply 1", "next", "reply 4"]
    picked = conv.messages[1]
    losers = [a.id for a in picked.alternatives]
    assert [a.content for a in picked.alternatives] == ["reply 2", "reply 3"]
    assert [(j.kind, j.other_id) for j in picked.judgements] == [
        ("pick", losers[0]),  # the first /pick 1
        ("pick", losers[0]),  # the second, of three
        ("pick", losers[1]),
    ]
    rows, counts = _export(log, "export_preference")
    assert rows == [
        {
            "prompt": [_msg("user", "q")],
            "chosen": [_msg("assistant", "reply 1")],
            "rejected": [_msg("assistant", f"reply {n}")],
        }
        for n in (2, 3)
    ]
    assert dict(counts.written) == {"pick": 2} and dict(counts.left_out) == {pref.REPEATED: 1}


def test_retry_then_good_makes_a_pair_with_the_bad_earlier_reply(tmp_path):
    log = ConversationLog(tmp_path / "log.sqlite3")
    repl, _ = _repl(log)
    repl.say("q")
    repl.command("/bad")
    repl.command("/retry")
    repl.command("/good")
    rows, counts = _export(log, "export_preference")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("reply 2", "reply 1")
    ]
    assert dict(counts.written) == {"good-bad": 1} and not counts.left_out


def test_judgements_need_the_log_and_help_lists_them(tmp_path):
    repl, err = _repl(None)
    repl.say("q")
    for command in ("/good", "/bad", "/edit x", "/pick 1"):
        repl.command(command)
        assert "judgements are kept in the conversation log; chat without --no-log" in _said(err)
    repl.command("/help")
    text = _said(err)
    assert all(c in text for c in ("/good, /bad", "/edit [TEXT]", "/pick N"))
    piped, _ = _repl(ConversationLog(tmp_path / "log.sqlite3"), interactive=False)
    piped.say("q")
    with pytest.raises(ChatforgeError, match="/edit needs the new text here"):
        piped.command("/edit")
    with pytest.raises(ChatforgeError, match="/good takes nothing"):
        piped.command("/good please")


def test_edit_opens_the_reply_for_editing_at_a_terminal(tmp_path, monkeypatch):
    from chatforge import repl_judge

    log = ConversationLog(tmp_path / "log.sqlite3")
    repl, err = _repl(log)
    repl.say("q")
    seen = []
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr(repl_judge, "ask_edit", lambda text: seen.append(text) or "Edited!")
    repl.command("/edit")
    assert seen == ["reply 1"] and repl.session.conversation.messages[-1].content == "Edited!"
    monkeypatch.setattr(repl_judge, "ask_edit", lambda text: None)  # Ctrl-C
    repl.command("/edit")
    assert "not edited" in _said(err)
    assert log.latest().messages[1].edit == "Edited!"


# ---------------------------------------------------------------- exports and the CLI


def _judged_log(path: Path) -> ConversationLog:
    """Two conversations judged every way (as the chat and the page leave them)."""
    log = ConversationLog(path)
    cid = log.new_conversation(model="m", system="Be kind.")
    log.add_message(cid, "user", "q1")
    a1 = log.add_message(cid, "assistant", "first try", model="m", finish_reason="stop")
    a2 = log.add_message(cid, "assistant", "second try", model="m", finish_reason="stop")
    log.set_alternative(a1, a2)  # a /retry
    log.judge(a1, "bad")
    log.judge(a2, "good")
    log.add_message(cid, "user", "q2")
    b = log.add_message(cid, "assistant", "Paris?", model="m", finish_reason="length")
    log.judge(b, "edit", text="Paris.")  # an edit makes a cut reply trainable
    log.add_message(cid, "user", "q3")
    c = log.add_message(cid, "assistant", "fine", model="m", finish_reason="stop")
    log.judge(c, "good")  # nothing to compare it with
    cid2 = log.new_conversation(model="m")
    log.add_message(cid2, "user", "x")
    m1 = log.add_message(cid2, "assistant", "A", model="m")
    m2 = log.add_message(cid2, "assistant", "B", model="m", alt_of=m1)  # a compare pick
    log.judge(m1, "pick", other_id=m2, source="web")
    log.judge(m1, "good")  # the same pair again
    log.judge(m2, "bad")
    return log


def test_preference_export_writes_trl_pairs_and_counts_what_it_left_out(tmp_path):
    log = _judged_log(tmp_path / "log.sqlite3")
    rows, counts = _export(log, "export_preference")
    system = _msg("system", "Be kind.")
    assert rows == [
        {
            "prompt": [system, _msg("user", "q1")],
            "chosen": [_msg("assistant", "second try")],
            "rejected": [_msg("assistant", "first try")],
        },
        {
            "prompt": [
                system,
                _msg("user", "q1"),
                _msg("assistant", "second try"),
                _msg("user", "q2"),
            ],
            "chosen": [_msg("assistant", "Paris.")],
            "rejected": [_msg("assistant", "Paris?")],
        },
        {
            "prompt": [_msg("user", "x")],
            "chosen": [_msg("assistant", "A")],
            "rejected": [_msg("assistant", "B")],
        },
    ]
    assert dict(counts.written) == {"good-bad": 1, "edit": 1, "pick": 1}
    assert dict(counts.left_out) == {pref.GOOD_ALONE: 1, pref.REPEATED: 1}
    rows, _ = _export(log)  # training: edits in place, alternatives left out
    assert rows == [
        {
            "messages": [
                system,
                *[_msg(r, t) for r, t in [("user", "q1"), ("assistant", "second try")]],
                *[_msg(r, t) for r, t in [("user", "q2"), ("assistant", "Paris.")]],
                *[_msg(r, t) for r, t in [("user", "q3"), ("assistant", "fine")]],
            ]
        },
        {"messages": [_msg("user", "x"), _msg("assistant", "A")]},
    ]


def test_logs_export_list_and_show_judgements(tmp_path, data_dir, capsys):
    data_dir.mkdir(parents=True)
    _judged_log(data_dir / "conversations.sqlite3").close()
    target = tmp_path / "prefs.jsonl"
    code, _, err = run(["logs", "export", "--format", "preference", "-o", str(target)], capsys)
    assert code == 0, err
    assert len(target.read_text().splitlines()) == 3
    assert err.strip() == (
        "exported 3 preference pairs (1 pick, 1 edit, 1 good-bad); left out 1 good reply "
        "with no bad one to the same prompt, 1 pair given twice (a pick and thumbs on the "
        "same replies)"
    )
    code, out, err = run(["logs", "export", "--format", "preference", "--cid", "2"], capsys)
    assert code == 0 and len(out.splitlines()) == 1 and "1 pick)" in err
    code, out, err = run(["logs", "export"], capsys)
    assert code == 0 and err.strip() == "exported 2 conversations; 1 reply as you edited them"
    code, _, err = run(["logs", "export", "--format", "preference", "--include-truncated"], capsys)
    assert code != 0 and "--include-truncated is for --format training" in err
    code, _, err = run(["logs", "export", "--format", "dpo"], capsys)
    assert code != 0 and "unknown export format 'dpo'; use training or preference" in err

    code, out, _ = run(["logs", "list"], capsys)
    header, *rows = out.strip().splitlines()
    assert code == 0 and header.split()[:5] == ["id", "when", "model", "turns", "judged"]
    assert [r.split()[:6:5] for r in rows] == [["2", "3"], ["1", "4"]]  # id, judged
    code, out, _ = run(["logs", "show", "1"], capsys)
    assert code == 0
    assert "assistant: second try\n  [m; stop]\n  👍 good\n\n  alternative #2" in out
    assert "alternative #2 (not in the history):\n    first try\n    [m; stop]\n    👎 bad" in out
    assert "assistant: Paris?\n  [m; length]\n  ✏ edited to:\n    Paris.\n" in out
    code, out, _ = run(["logs", "show", "2"], capsys)
    assert "✔ picked over alternative #" in out and "👍 good" in out


# ---------------------------------------------------------------- POST /v1/feedback


@pytest.fixture(scope="module")
def feedback_app(tiny_llama_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from chatforge import load_model
    from chatforge.server import create_app

    path = tmp_path_factory.mktemp("feedback") / "log.sqlite3"
    loaded = load_model(str(tiny_llama_dir))
    app = create_app(loaded, model_id="tiny", log=path, api_key="k")
    off = create_app(loaded, model_id="tiny", log=False)
    with TestClient(app) as client, TestClient(off) as client_off:
        client.headers["Authorization"] = "Bearer k"
        yield client, client_off, path


def _reply(content: str, **kw) -> dict:
    return {"model": "tiny", "settings": {"temperature": 0.7}, "content": content, **kw}


PICK = {
    "kind": "pick",
    "messages": [_msg("system", "Be kind."), _msg("user", "hi")],
    "replies": [
        _reply(
            "hello", response_id="chatcmpl-1", usage={"prompt_tokens": 5, "completion_tokens": 1}
        ),
        _reply("go away", response_id="chatcmpl-2", usage=None),
    ],
    "chosen": 0,
    "source": "web",
}


def test_feedback_route_keeps_a_pick_in_the_log(feedback_app):
    client, _, path = feedback_app
    r = client.post("/v1/feedback", json=PICK)
    assert r.status_code == 200, r.text
    body = r.json()
    log = ConversationLog(path)
    conv = log.get(body["conversation_id"])
    assert conv.backend == "server" and conv.system == "Be kind."
    assert [m.content for m in conv.messages] == ["hi", "hello"]
    main = conv.messages[1]
    assert main.response_id == "chatcmpl-1" and main.params == {"temperature": 0.7}
    assert (main.prompt_tokens, main.completion_tokens) == (5, 1)
    assert [(a.content, a.response_id) for a in main.alternatives] == [("go away", "chatcmpl-2")]
    [j] = main.judgements
    assert (j.id, j.kind, j.other_id, j.source) == (
        body["id"],
        "pick",
        main.alternatives[0].id,
        "web",
    )
    r = client.post(
        "/v1/feedback",
        json={
            "kind": "edit",
            "messages": [_msg("user", "2+2?")],
            "replies": [_reply("5")],
            "edited": "4",
        },
    )
    assert r.status_code == 200, r.text
    rows, _ = _export(log, "export_preference", cids=[r.json()["conversation_id"]])
    assert rows == [
        {
            "prompt": [_msg("user", "2+2?")],
            "chosen": [_msg("assistant", "4")],
            "rejected": [_msg("assistant", "5")],
        }
    ]
    assert log.get(r.json()["conversation_id"]).messages[1].judgements[0].source == "api"
    log.close()


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"kind": "meh"}, "kind", "Input should be"),
        ({"chosen": 2}, "chosen", "chosen must be 0 to 1"),
        ({"chosen": None}, "chosen", "a pick needs chosen"),
        ({"replies": [_reply("one")]}, "replies", "a pick needs two replies or more"),
        ({"replies": [_reply("one"), _reply(" ")]}, "replies[1].content", "content is empty"),
        ({"colour": "red"}, "colour", "unrecognized request argument supplied: colour"),
        ({"replies": [_reply("a", seed=1), _reply("b")]}, "replies[0].seed", "unrecognized"),
        ({"messages": [_msg("user", "hi"), _msg("assistant", "x")]}, "messages", "must end with"),
        (
            {"messages": [_msg("user", "a"), _msg("system", "s"), _msg("user", "b")]},
            "messages[1]",
            "a system message may only come first",
        ),
        ({"kind": "good"}, "replies", "a good judgement takes one reply, got 2"),
        ({"kind": "edit", "replies": [_reply("x")], "chosen": None}, "edited", "an edit needs"),
        ({"edited": "x"}, "edited", "edited is for kind edit only"),
        ({"source": "fax"}, "source", "Input should be"),
    ],
)
def test_feedback_route_names_the_bad_field(feedback_app, change, param, message):
    client, _, path = feedback_app
    before = ConversationLog(path).count()
    r = client.post("/v1/feedback", json={**PICK, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert ConversationLog(path).count() == before  # nothing half-written


def test_feedback_route_needs_the_key_and_says_when_the_log_is_off(feedback_app):
    client, client_off, _ = feedback_app
    r = client.post("/v1/feedback", json=PICK, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = client_off.post("/v1/feedback", json=PICK)
    assert r.status_code == 501 and "--no-log" in r.json()["error"]["message"]
    state = get_state(client)
    state.draining = True
    try:
        assert client.post("/v1/feedback", json=PICK).status_code == 503
    finally:
        state.draining = False


def test_chat_command_judges_through_its_real_entry_point(capsys, data_dir, tiny_llama_dir):
    argv = ["chat", "--model", str(tiny_llama_dir), "-t", "0", "--max-new-tokens", "3"]
    code, _, err = run(argv, capsys, "hi\n/retry\n/pick 1\n/edit Mine.\n/good\n")
    assert code == 0, err
    assert "picked reply 1 of 2" in err and "edited the last reply" in err
    conv = ConversationLog().latest()
    [reply] = [m for m in conv.messages if m.role == "assistant"]
    assert [j.kind for j in reply.judgements] == ["pick", "edit", "good"]
    assert reply.final_text == "Mine." and len(reply.alternatives) == 1
    code, _, err = run([*argv, "--continue"], capsys, "/history\n")
    assert code == 0 and "assistant: Mine." in err
    code, _, err = run([*argv, "--no-log"], capsys, "hi\n/good\n")
    assert code != 0 and "judgements are kept in the conversation log" in err


def test_retry_after_a_system_change_logs_the_history_afresh(tmp_path):
    """The system row sits after the question: a reply beside the old one would be
    trained under the wrong prompt, so the retry starts a new logged conversation."""
    log = ConversationLog(tmp_path / "log.sqlite3")
    repl, _ = _repl(log)
    repl.say("q")
    first = repl.session.cid
    repl.command("/system Be terse.")
    repl.command("/retry")
    conv = log.latest()
    assert conv.id != first and conv.system == "Be terse."
    assert [m.content for m in conv.messages] == ["q", "reply 2"]
    assert conv.messages[1].alternatives == []
    repl.command("/good")
    assert log.get(conv.id).messages[1].verdict == "good"
