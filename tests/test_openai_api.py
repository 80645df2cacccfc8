"""One mapping from GenerationConfig to OpenAI request fields (chatforge.openai_api), used
by `chat --api-base` and `generate --api-base` alike: the fields each sends, the rule for
extras, an endpoint that rejects unknown fields (as OpenAI does), and a chatforge server
honouring what it is sent."""

from __future__ import annotations

import json

import pytest

from chatforge import GenerationConfig, load_model
from chatforge.batch.remote import generate_batch_remote
from chatforge.chat import ChatSession
from chatforge.errors import ChatforgeError, ParamError
from chatforge.generation.config import PRESETS
from chatforge.openai_api import (
    EXTRAS,
    STANDARD,
    UNSENDABLE,
    openai_client,
    remote_config,
    request_params,
)
from chatforge.remote import RemoteSession
from chatforge.server import create_app
from cli_helpers import run
from serverkit import ServerThread

# ------------------------------------------------------------------ the mapping


def test_every_setting_has_one_fate():
    # A setting added to GenerationConfig must be mapped (or refused) here, never dropped.
    assert STANDARD | set(EXTRAS) | UNSENDABLE == set(GenerationConfig.param_names())
    assert not (STANDARD & set(EXTRAS)) and not (UNSENDABLE & (STANDARD | set(EXTRAS)))
    # chatforge's own server takes every extra under the name sent.
    from chatforge.server.schemas import ChatCompletionRequest, CompletionRequest

    for request in (ChatCompletionRequest, CompletionRequest):
        assert set(EXTRAS) <= set(request.model_fields)


def test_each_setting_maps_to_its_field():
    schema = {"type": "object"}
    config = GenerationConfig(
        temperature=0.7,
        top_p=0.8,
        max_new_tokens=12,
        stop=("x", "y"),
        seed=5,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        logit_bias={42: -100, 7: 2.5},
        json_schema=schema,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        no_repeat_ngram_size=3,
    )
    expected = {
        "temperature": 0.7,
        "top_p": 0.8,
        "max_tokens": 12,
        "stop": ["x", "y"],
        "seed": 5,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": {"42": -100.0, "7": 2.5},  # OpenAI's keys are strings
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True},
        },
        "top_k": 40,  # extras: top-level fields of the same name
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "no_repeat_ngram_size": 3,
    }
    assert request_params(config) == expected
    assert request_params(config, endpoint="completions") == expected
    with pytest.raises(ValueError, match="endpoint"):
        request_params(config, endpoint="embeddings")  # type: ignore[arg-type]


def test_extras_at_their_off_value_are_not_sent():
    neutral = GenerationConfig(top_k=0, min_p=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert request_params(neutral) == {"temperature": 1.0, "max_tokens": 256}
    for name in EXTRAS:
        assert name not in request_params(
            GenerationConfig.default().replace(**{name: EXTRAS[name]})
        )


def test_greedy_is_temperature_0_and_filters_that_cannot_matter_stay_home():
    for config in (
        GenerationConfig(temperature=0, top_p=0.5, top_k=3, min_p=0.1, repetition_penalty=1.2),
        GenerationConfig(
            temperature=0.9, do_sample=False, top_p=0.5, top_k=3, min_p=0.1, repetition_penalty=1.2
        ),
    ):
        # A penalty changes greedy tokens, so it is sent; top-p/top-k/min-p cannot.
        assert request_params(config) == {
            "temperature": 0.0,
            "max_tokens": 256,
            "repetition_penalty": 1.2,
        }


def test_settings_no_request_can_carry_are_errors_naming_them():
    with pytest.raises(ParamError, match="max_length cannot be sent") as e:
        request_params(GenerationConfig(max_length=64))
    assert e.value.param == "max_length"
    with pytest.raises(ParamError, match="at most 4") as e:
        request_params(GenerationConfig(stop=("a", "b", "c", "d", "e")))
    assert e.value.param == "stop"
    # A remote chat refuses it when set, not at the next turn.
    chat = RemoteSession("http://127.0.0.1:9/v1", "m")
    with pytest.raises(ParamError, match="max_length"):
        chat.config = chat.config.replace(max_length=64)
    with pytest.raises(ParamError, match="max_length"):
        RemoteSession("http://127.0.0.1:9/v1", "m", config=GenerationConfig(max_length=64))


def test_remote_config_default_preset_gives_what_every_endpoint_takes():
    balanced = PRESETS["balanced"]
    assert remote_config() == GenerationConfig(
        temperature=balanced["temperature"], top_p=balanced["top_p"]
    )
    assert remote_config(None, top_k=40, seed=None).top_k == 40
    # A preset named is the preset, extras included, as locally (and -t 0 drops penalties).
    assert remote_config("balanced") == GenerationConfig.from_preset("balanced")
    assert remote_config("creative", temperature=0) == GenerationConfig.from_preset(
        "creative", temperature=0
    )
    with pytest.raises(ChatforgeError, match="unknown preset"):
        remote_config("wild")


def test_the_client_names_the_package_it_needs(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openai", None)  # as if not installed
    with pytest.raises(ChatforgeError, match=r"needs the openai package: pip install"):
        openai_client("http://127.0.0.1:9/v1")


# ------------------------------------------------------------------ a strict endpoint

# The fields of OpenAI's chat completion request (what a strict endpoint accepts).
OPENAI_CHAT_FIELDS = {
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
    "max_completion_tokens", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logit_bias", "response_format", "n", "logprobs", "top_logprobs", "user",
}  # fmt: skip


class FakeEndpoint:
    """An ASGI OpenAI-compatible chat endpoint that records each request body and
    answers "ok"; ``strict``: a field OpenAI lacks is a 400 in OpenAI's words."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.strict = True

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] == "/health":
            await self._send(send, 200, b"{}")
            return
        req = json.loads(body)
        self.bodies.append(req)
        unknown = sorted(set(req) - OPENAI_CHAT_FIELDS)
        if self.strict and unknown:
            error = {
                "message": f"Unrecognized request argument supplied: {unknown[0]}",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
            await self._send(send, 400, json.dumps({"error": error}).encode())
            return
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        head = {"id": "c1", "created": 0, "model": req["model"]}
        if not req.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}}
            answer = {**head, "object": "chat.completion", "usage": usage}
            answer["choices"] = [{**choice, "finish_reason": "stop"}]
            await self._send(send, 200, json.dumps(answer).encode())
            return
        chunk = {**head, "object": "chat.completion.chunk"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": usage},
        ]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        await self._send(send, 200, text.encode(), b"text/event-stream")

    @staticmethod
    async def _send(send, status: int, body: bytes, kind: bytes = b"application/json") -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}
        )
        await send({"type": "http.response.body", "body": body})


class _State:
    status = "ready"


@pytest.fixture(scope="module")
def fake():
    app = FakeEndpoint()
    app.state = type("S", (), {"chatforge": _State()})()  # what ServerThread polls on failure
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture()
def endpoint(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("CHATFORGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake.app.bodies.clear()
    fake.app.strict = True
    return fake


def _sent(body: dict) -> dict:
    """The generation fields of a request body (not what the request is about)."""
    return {k: v for k, v in body.items() if k not in ("model", "messages", "stream",
                                                       "stream_options")}  # fmt: skip


def _chat(srv, capsys, *flags):
    argv = ["chat", "--api-base", srv.url + "/v1", "--model", "m", "--no-log", *flags]
    return run(argv, capsys, "Hello\n")


def _generate(srv, capsys, tmp_path, *flags):
    inp = tmp_path / "in.txt"
    inp.write_text("Hello\n")
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    argv = ["generate", str(inp), "-o", str(out), "--api-base", srv.url + "/v1"]
    return run([*argv, "--model", "m", "--no-progress", *flags], capsys)


ALL_FLAGS = [
    "--temperature", "0.7", "--top-p", "0.8", "--top-k", "40", "--min-p", "0.05",
    "--repetition-penalty", "1.1", "--no-repeat-ngram-size", "3",
    "--presence-penalty", "0.5", "--frequency-penalty", "0.25", "--logit-bias", "42:-100",
    "--json-schema", '{"type": "object"}', "--max-new-tokens", "12", "--stop", "END",
    "--seed", "5",
]  # fmt: skip


def test_chat_and_generate_send_the_same_fields(endpoint, capsys, tmp_path):
    # Regression: generate --api-base refused --top-k/--min-p/--repetition-penalty, while
    # chat --api-base sent them but dropped presence/frequency penalties, logit_bias and
    # json_schema.
    endpoint.app.strict = False
    code, out, err = _chat(endpoint, capsys, *ALL_FLAGS)
    assert code == 0 and out == "ok\n", err
    code, _, err = _generate(endpoint, capsys, tmp_path, *ALL_FLAGS)
    assert code == 0, err
    chat, generate = (_sent(b) for b in endpoint.app.bodies)
    assert (
        chat
        == generate
        == request_params(
            GenerationConfig(
                temperature=0.7,
                top_p=0.8,
                top_k=40,
                min_p=0.05,
                repetition_penalty=1.1,
                no_repeat_ngram_size=3,
                presence_penalty=0.5,
                frequency_penalty=0.25,
                logit_bias={42: -100},
                json_schema={"type": "object"},
                max_new_tokens=12,
                stop=("END",),
                seed=5,
            )
        )
    )
    assert chat["top_k"] == 40 and chat["logit_bias"] == {"42": -100.0}


def test_defaults_send_only_what_every_endpoint_takes(endpoint, capsys, tmp_path):
    # Regression: chat --api-base sent the default preset's min_p and repetition_penalty,
    # so a plain `chat --api-base` against OpenAI answered 400 before the first reply.
    code, out, err = _chat(endpoint, capsys)
    assert code == 0 and out == "ok\n", err
    code, _, err = _generate(endpoint, capsys, tmp_path)
    assert code == 0, err
    sent = [_sent(b) for b in endpoint.app.bodies]
    assert sent == [{"temperature": 0.2, "top_p": 0.9, "max_tokens": 256}] * 2
    chat = RemoteSession(endpoint.url + "/v1", "m")  # the library's default too
    assert chat.send("Hi").text == "ok"
    # A preset named is applied whole: its extras are switched on, and sent.
    code, _, err = _chat(endpoint, capsys, "--preset", "balanced")
    assert code == 2 and "Unrecognized request argument supplied: min_p" in err


def test_an_extra_a_strict_endpoint_rejects_is_one_line_naming_it(endpoint, capsys, tmp_path):
    code, _, err = _chat(endpoint, capsys, "--top-k", "40")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "answered 400: Unrecognized request argument supplied: top_k" in err
    code, _, err = _generate(endpoint, capsys, tmp_path, "--top-k", "40")
    assert code == 1, err  # every record rejected: error rows, exit 1
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert "Unrecognized request argument supplied: top_k" in row["error"]


def test_max_length_is_refused_before_anything_is_sent(endpoint, capsys, tmp_path):
    code, _, err = _chat(endpoint, capsys, "--max-length", "50")
    assert code == 2 and "--max-length cannot be sent" in err, err
    code, _, err = _generate(endpoint, capsys, tmp_path, "--max-length", "50")
    assert code == 2 and "--max-length cannot be sent" in err, err
    assert endpoint.app.bodies == []


# ------------------------------------------------------------------ a chatforge server


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    app = create_app(load_model(str(tiny_llama_dir)), model_id="tiny")
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def _remote_reply(srv, config: GenerationConfig) -> str:
    return RemoteSession(srv.url + "/v1", "tiny", config=config).send("Hello there").text


def _local_reply(loaded, config: GenerationConfig) -> str:
    return ChatSession(loaded, config).send("Hello there").text


def test_top_k_1_reaches_the_server_and_is_greedy(server, tmp_path):
    greedy = GenerationConfig(temperature=0, max_new_tokens=8)
    top1 = GenerationConfig(temperature=1.5, top_k=1, max_new_tokens=8, seed=3)
    sampled = GenerationConfig(temperature=1.5, max_new_tokens=8, seed=3)
    assert _remote_reply(server, top1) == _remote_reply(server, greedy)
    assert _remote_reply(server, sampled) != _remote_reply(server, greedy)  # it had to act
    # ... through generate too (which refused top_k before).
    rows = {}
    for name, config in (("greedy", greedy), ("top1", top1)):
        out = tmp_path / f"{name}.jsonl"
        summary = generate_batch_remote(
            server.url + "/v1", "tiny", ["Hello there", "Bye"], out, config=config,
            progress=False,
        )  # fmt: skip
        assert summary.done == 2
        rows[name] = [json.loads(line)["output"] for line in out.read_text().splitlines()]
    assert rows["top1"] == rows["greedy"]


def test_completions_fields_reach_the_server(server):
    # The completions endpoint takes the same fields (response_format too, on chatforge).
    import httpx

    def text(config: GenerationConfig) -> str:
        body = {
            "model": "tiny",
            "prompt": "Hello there",
            **request_params(config, endpoint="completions"),
        }
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = GenerationConfig(temperature=0, max_new_tokens=8)
    assert text(GenerationConfig(temperature=1.5, top_k=1, max_new_tokens=8, seed=3)) == text(
        greedy
    )
    assert text(greedy.replace(json_schema={"type": "object"})).startswith("{")


def test_chat_settings_it_used_to_drop_are_honoured(server, local):
    # Regression: RemoteSession did not send logit_bias, presence/frequency penalties,
    # no_repeat_ngram_size or json_schema; the server's reply now equals a local chat's
    # with the same settings (and each setting changes the reply: it was acted on).
    base = GenerationConfig(temperature=0, max_new_tokens=24)  # repeats within 24 tokens
    plain = _remote_reply(server, base)
    first = local.tokenizer.encode(plain, add_special_tokens=False)[0]
    for config in (
        base.replace(logit_bias={first: -100}),
        base.replace(presence_penalty=2.0, frequency_penalty=2.0),
        base.replace(no_repeat_ngram_size=1),
        base.replace(json_schema={"type": "object"}, max_new_tokens=12),
    ):
        remote = _remote_reply(server, config)
        assert remote == _local_reply(local, config), config
        assert remote != plain[: len(remote)], config
    assert remote.startswith("{")
