"""`chatforge chat --api-base` against our own server, through the real entry point."""

from __future__ import annotations

import httpx
import pytest

from chatforge import load_model
from chatforge.remote import RemoteSession
from chatforge.server import create_app
from chatforge.store import ConversationLog
from cli_helpers import run
from serverkit import ServerThread


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    app = create_app(load_model(str(tiny_llama_dir)), model_id="tiny", api_key="sekret")
    with ServerThread(app) as srv:
        yield srv


def _api_reply(srv, messages, max_tokens):
    r = httpx.post(
        srv.url + "/v1/chat/completions",
        headers={"Authorization": "Bearer sekret"},
        json={"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": max_tokens},
    )
    return r.json()["choices"][0]["message"]["content"]


def test_remote_chat_cli_is_logged_and_continues(server, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TEST_KEY", "sekret")
    base = server.url + "/v1"
    flags = ["--api-base", base, "--api-key-env", "TEST_KEY", "--model", "tiny"]
    flags += ["--preset", "precise", "--max-new-tokens", "6", "--system", "Be brief."]
    code, out, err = run(["chat", *flags], capsys, "Hello remote\n")
    assert code == 0, err
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello remote"}]
    first = _api_reply(server, msgs, 6)
    assert out == first + "\n"

    code, out, err = run(["chat", *flags, "--continue"], capsys, "Again\n")
    assert code == 0, err
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "Again"}]
    assert out == _api_reply(server, msgs, 6) + "\n"  # the history went to the server

    (conv,) = ConversationLog().list()
    conv = ConversationLog().get(conv.id)
    assert conv.backend == "remote" and conv.api_base == base and conv.model == "tiny"
    replies = [m for m in conv.messages if m.role == "assistant"]
    assert len(replies) == 2 and all(m.completion_tokens == 6 for m in replies)
    assert all(m.prompt_tokens > 0 and m.finish_reason == "length" for m in replies)


def test_remote_errors_are_one_line(server, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = server.url + "/v1"
    code, _, err = run(["chat", "--api-base", base, "--model", "tiny"], capsys, "hi\n")
    assert code == 2 and "401" in err and "API key" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(
        ["chat", "--api-base", base, "--api-key-env", "NOT_SET_ANYWHERE", "--model", "tiny"],
        capsys,
        "hi\n",
    )
    assert code == 2 and "NOT_SET_ANYWHERE is not set" in err
    monkeypatch.setenv("K", "sekret")
    code, _, err = run(
        ["chat", "--api-base", base, "--api-key-env", "K", "--model", "nope"], capsys, "hi\n"
    )
    assert code == 2 and "404" in err and "does not exist" in err
    code, _, err = run(
        ["chat", "--api-base", "http://127.0.0.1:9/v1", "--model", "x"], capsys, "hi\n"
    )
    assert code == 2 and "cannot reach" in err
    assert ConversationLog().list() == []  # failed exchanges are not logged


def test_remote_session_library_and_interrupt(server):
    chat = RemoteSession(server.url + "/v1", "tiny", api_key="sekret")
    chat.config = chat.config.replace(temperature=0, max_new_tokens=50)
    gen = chat.stream("Hi")
    next(gen)
    gen.close()  # stop early: the stream is closed and the partial reply kept in .last
    assert chat.last.finish_reason == "interrupted" and chat.last.text
    # ... but not in the history the endpoint is sent next time
    assert [m.role for m in chat.conversation.messages] == ["user"]
    reply = chat.send("More")
    assert reply.completion_tokens > 0 and reply.finish_reason in ("stop", "length")
    assert reply.first_token_seconds is not None and reply.first_token_seconds <= reply.seconds
    assert [m.role for m in chat.conversation.messages] == ["user", "user", "assistant"]
