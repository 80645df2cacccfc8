"""`chatforge generate --api-base` against our own server (the tiny Llama), through
the real entry point: same rows as a local run, resumable, ordered, one-line errors."""

from __future__ import annotations

import json

import pytest

from chatforge import GenerationConfig, load_model
from chatforge.batch.remote import generate_batch_remote
from chatforge.errors import ParamError
from chatforge.openai_api import remote_config, request_params
from chatforge.server import create_app
from cli_helpers import run
from serverkit import ServerThread, slow_steps

PROMPTS = ["Hello there", "What is up", "Tell me a story", "Bye", "One more", "And again"]


class Watched:
    """The server's app, counting chat-completion requests (and the most in flight at
    once); a request whose body holds ``fail_marker`` is answered 500."""

    def __init__(self, app) -> None:
        self.app = app
        self.state = app.state
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_marker: str | None = None
        self.seeds: list[int | None] = []  # each request's "seed"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.calls += 1
        self.seeds.append(json.loads(body or b"{}").get("seed"))
        if self.fail_marker and self.fail_marker.encode() in body:
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "boom"}}'})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    app = Watched(create_app(load_model(str(tiny_llama_dir)), model_id="tiny", api_key="sekret"))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture()
def watched(server):
    app = server.app
    app.calls = app.max_in_flight = 0
    app.fail_marker = None
    app.seeds = []
    return app


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("CHATFORGE_API_KEY", "sekret")


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_input(path, prompts=PROMPTS):
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "q": p}) + "\n" for i, p in enumerate(prompts))
    )
    return path


def remote(server, inp, out, capsys, *flags):
    argv = ["generate", str(inp), "-o", str(out), "--api-base", server.url + "/v1"]
    argv += ["--model", "tiny", "--no-progress", *flags]
    return run(argv, capsys)


GREEDY = ["-t", "0", "--max-new-tokens", "6", "--template", "Q: {q}", "--system", "Be brief."]


def test_rows_equal_the_local_run(server, watched, tiny_llama_dir, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl")
    local, far = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    argv = ["generate", str(inp), "-o", str(local), "--model", str(tiny_llama_dir)]
    code, _, err = run([*argv, "--no-progress", *GREEDY], capsys)
    assert code == 0, err
    code, _, err = remote(server, inp, far, capsys, *GREEDY, "--max-concurrency", "3")
    assert code == 0, err
    assert "6 records: 6 done, 0 errors" in err
    a, b = rows(local), rows(far)
    assert [set(r) for r in a] == [set(r) for r in b]  # the same fields
    same = ("id", "source", "prompt", "output", "finish_reason", "key", "error")
    same += ("prompt_tokens", "completion_tokens")
    assert [[r[k] for k in same] for r in a] == [[r[k] for k in same] for r in b]
    assert b[0]["model"] == {"name": "tiny", "ref": "tiny", "api_base": server.url + "/v1"}
    assert b[0]["params"]["temperature"] == 0.0 and b[0]["params"]["max_new_tokens"] == 6
    assert watched.calls == len(PROMPTS)


def test_resume_skips_done_rows_and_cuts_a_torn_one(server, watched, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    assert remote(server, inp, out, capsys, *GREEDY)[0] == 0
    full = out.read_text().splitlines(keepends=True)
    out.write_text("".join(full[:2]) + full[2][:15])  # killed while writing the third row
    watched.calls = 0
    code, _, err = remote(server, inp, out, capsys, *GREEDY)
    assert code == 0, err
    assert watched.calls == 4 and "2 skipped" in err and "cut a torn last row" in err

    def content(r):
        return {k: v for k, v in r.items() if k != "seconds"}

    assert [content(r) for r in rows(out)] == [content(json.loads(line)) for line in full]
    watched.calls = 0
    code, _, err = remote(server, inp, out, capsys, *GREEDY)
    assert code == 0 and watched.calls == 0 and "nothing to do" in err


def test_concurrency_keeps_input_order(server, watched, tmp_path, capsys):
    prompts = [f"prompt {i} " + "word " * (i % 4) * 5 for i in range(10)]
    inp = write_input(tmp_path / "in.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    engine = server.state.service.engine
    step = engine.step
    slow_steps(server.state, 0.01)  # requests stay in flight together
    try:
        flags = ["--max-concurrency", "4", "--max-new-tokens", "5", "--template", "{q}"]
        code, _, err = remote(server, inp, out, capsys, *flags, "--n", "2", "--seed", "3")
    finally:
        engine.step = step
    assert code == 0, err
    got = rows(out)
    assert [r["id"] for r in got] == [f"r{i}" for i in range(10)]
    assert [r["prompt"] for r in got] == prompts
    assert all(len(r["outputs"]) == 2 and r["n"] == 2 for r in got)
    assert watched.calls == 20 and watched.max_in_flight > 1
    assert sorted(watched.seeds) == [3] * 10 + [4] * 10  # sample j sends seed 3 + j


def test_endpoint_errors(server, watched, tmp_path, capsys, monkeypatch):
    inp = write_input(tmp_path / "in.jsonl", ["short", "word " * 400, "fine", "FAIL-ME"])
    out = tmp_path / "out.jsonl"
    watched.fail_marker = "FAIL-ME"
    code, _, err = remote(server, inp, out, capsys, "--max-new-tokens", "3", "--template", "{q}")
    assert code == 0, err
    got = rows(out)  # the rejected prompt has an error row; the 500 one none (retried later)
    assert [r["id"] for r in got] == ["r0", "r1", "r2"]
    assert got[1]["output"] is None and "answered 400" in got[1]["error"]
    assert "maximum context length" in got[1]["error"] and got[1]["source"].endswith(":2")
    assert "answered 500: boom (no row written: a rerun retries it)" in err
    assert "4 records: 2 done, 2 errors" in err
    assert "errors by kind: 1 not answered, 1 rejected by the endpoint" in err
    watched.fail_marker = None
    code, _, err = remote(server, inp, out, capsys, "--max-new-tokens", "3", "--template", "{q}")
    assert code == 0 and "1 done, 0 errors, 3 skipped" in err
    assert [r["id"] for r in rows(out)] == ["r0", "r1", "r2", "r3"]

    # Failures every row would meet: one line, nothing written.
    gone = tmp_path / "gone.jsonl"
    argv = ["generate", str(inp), "-o", str(gone), "--api-base", "http://127.0.0.1:9/v1"]
    code, _, err = run([*argv, "--model", "x", "--no-progress", "-T", "{q}"], capsys)
    assert code == 2 and err.startswith("error: cannot reach http://127.0.0.1:9/v1"), err
    assert len(err.strip().splitlines()) == 1 and gone.read_text() == ""
    monkeypatch.delenv("CHATFORGE_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, _, err = remote(server, inp, gone, capsys, "-T", "{q}")
    assert code == 2 and "answered 401" in err and "no API key was given" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("CHATFORGE_API_KEY", "sekret")
    argv = ["generate", str(inp), "-o", str(gone), "--api-base", server.url + "/v1"]
    code, _, err = run([*argv, "--model", "nope", "--no-progress", "-T", "{q}"], capsys)
    assert code == 2 and "answered 404" in err and len(err.strip().splitlines()) == 1


def test_resume_with_other_settings_is_refused(server, watched, tiny_llama_dir, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    assert remote(server, inp, out, capsys, *GREEDY)[0] == 0
    assert rows(out)[0]["settings"]["api_base"] == server.url + "/v1"
    before = out.read_bytes()
    watched.calls = 0
    code, _, err = remote(server, inp, out, capsys, *GREEDY, "-t", "0.5")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{out} holds 6 rows made with temperature=0.0; this run has temperature=0.5" in err
    # A local run into the endpoint's output (another model, no endpoint) is refused too.
    argv = ["generate", str(inp), "-o", str(out), "--model", str(tiny_llama_dir)]
    code, _, err = run([*argv, "--no-progress", *GREEDY], capsys)
    assert code == 2 and f"made with model=tiny api_base={server.url}/v1" in err, err
    assert "api_base=none" in err
    assert out.read_bytes() == before and watched.calls == 0
    code, _, err = remote(server, inp, out, capsys, *GREEDY, "-t", "0.5", "--force-resume")
    assert code == 0 and "nothing to do" in err and watched.calls == 0


def test_exit_1_when_the_endpoint_rejects_every_record(server, watched, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", ["word " * 400, "word " * 401])
    out = tmp_path / "out.jsonl"
    code, _, err = remote(server, inp, out, capsys, "--max-new-tokens", "3", "--template", "{q}")
    assert code == 1, err
    assert "errors by kind: 2 rejected by the endpoint" in err
    assert "error: no record succeeded: all 2 records this run tried failed" in err
    assert [r["output"] for r in rows(out)] == [None, None]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-length", "50"], "--max-length cannot be sent to an OpenAI-compatible"),
        (
            ["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"],
            "--stop takes at most 4 strings",
        ),
        (["--batch-size", "4"], "--batch-size applies to a local model"),
        (["--quantize", "int8"], "--quantize applies to a local model"),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
        (["--api-key-env", "NOT_SET_HERE"], "NOT_SET_HERE is not set"),
    ],
)
def test_flags_an_endpoint_cannot_take(flags, needle, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(inp), "-o", str(out), "--api-base", "http://127.0.0.1:9/v1"]
    code, _, err = run([*argv, "--model", "x", *flags], capsys)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_local_only_and_remote_only_flags(tiny_llama_dir, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl")
    argv = ["generate", str(inp), "-o", str(tmp_path / "o.jsonl"), "--model", str(tiny_llama_dir)]
    code, _, err = run([*argv, "--max-concurrency", "2"], capsys)
    assert code == 2 and "--max-concurrency applies to --api-base" in err
    # Settings at their off value are not sent; the default preset sends what an endpoint takes.
    assert request_params(remote_config(None, top_k=0, min_p=0.0, repetition_penalty=1.0)) == {
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 256,
    }
    assert request_params(remote_config("precise", max_new_tokens=4, stop=("x",), seed=1)) == {
        "temperature": 0.0,
        "max_tokens": 4,
        "stop": ["x"],
        "seed": 1,
    }
    with pytest.raises(ParamError, match="max_length cannot be sent"):
        generate_batch_remote(
            "http://x/v1", "m", ["a"], tmp_path / "x.jsonl", config=GenerationConfig(max_length=9)
        )
