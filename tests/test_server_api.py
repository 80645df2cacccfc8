"""The OpenAI-compatible server on the tiny random Llama: protocol, errors, limits, batching."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from chatforge import load_model
from chatforge.server import Limits, create_app
from serverkit import ServerThread, slow_steps, wait_until

LIMITS = Limits(max_tokens=200, max_n=4, max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def server(tiny):
    with ServerThread(create_app(tiny, model_id="tiny", limits=LIMITS)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="none", _strict_response_validation=True
    )


def chat_body(**kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}]}
    body.update(kw)
    return body


def sse_events(lines) -> list:
    """Parse an SSE body into decoded JSON chunks, checking its framing; ends with "[DONE]"."""
    events, block = [], []
    for line in lines:
        if line == "":
            if block:
                assert len(block) == 1 and block[0].startswith("data: "), block
                data = block[0][len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
                block = []
            continue
        block.append(line)
    assert not block, "the stream ended mid-event"
    assert events and events[-1] == "[DONE]", "the stream must end with data: [DONE]"
    assert events.count("[DONE]") == 1
    return events


def check_chat_stream(events, n=1, usage=False) -> list[str]:
    """Framing of a chat stream: role first, content deltas, a finish chunk per choice."""
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    texts = [""] * n
    finished = [None] * n
    seen_role = [False] * n
    for c in chunks:
        for ch in c["choices"]:
            i = ch["index"]
            assert finished[i] is None, "a chunk after the choice finished"
            if "role" in ch["delta"]:
                seen_role[i] = True
            assert seen_role[i], "the first chunk of a choice must carry the role"
            texts[i] += ch["delta"].get("content") or ""
            finished[i] = ch["finish_reason"]
    assert all(f in ("stop", "length") for f in finished)
    if usage:
        last = chunks[-1]
        assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    return texts


# ------------------------------------------------------------------ happy paths


def test_health_models_and_page(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert httpx.get(server.url + "/v1/models/tiny").json()["id"] == "tiny"
    assert httpx.get(server.url + "/v1/models/other").status_code == 404
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/static/chat.js" in page.text
    assert "/v1/chat/completions" in httpx.get(server.url + "/static/chat.js").text


def test_chat_streamed_equals_not_streamed(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    stream = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        temperature=0,
        max_completion_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == choice.message.content
    assert finish == "length" and usage.completion_tokens == 12
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_raw_stream_framing(server):
    body = chat_body(
        temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    check_chat_stream(events, usage=True)


def test_n_choices_with_seed_are_reproducible(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
    a = client.chat.completions.create(n=3, seed=7, temperature=1.0, **kw)
    b = client.chat.completions.create(n=3, seed=7, temperature=1.0, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    # n streamed choices interleave, each framed on its own
    stream = client.chat.completions.create(n=2, seed=7, temperature=1.0, stream=True, **kw)
    texts = ["", ""]
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in a.choices[:2]]


def test_stop_sequence_is_honoured(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=0)
    text = client.chat.completions.create(max_tokens=40, **kw).choices[0].message.content
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].isalpha())
    cut = client.chat.completions.create(max_tokens=40, stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == text[: text.index(stop)]


def test_text_completions(client, server):
    full = client.completions.create(model="tiny", prompt="Once upon", max_tokens=9, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 9
    # The client types a streamed completion's finish_reason as never null, which OpenAI's
    # own streams break too (it is null until the last chunk): read streams leniently.
    lenient = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    streamed = "".join(
        c.choices[0].text
        for c in lenient.completions.create(
            model="tiny", prompt="Once upon", max_tokens=9, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == full.choices[0].text


def test_streamed_completions_have_openais_chunk_shape(server):
    # OpenAI's own /v1/completions stream: every chunk is a full "text_completion" whose
    # choices carry text, logprobs and finish_reason, null until the choice's last chunk.
    # (openai-python types that finish_reason as never null, so only its default,
    # non-strict parsing reads OpenAI's stream, and ours; strict validation rejects both.)
    body = {
        "model": "tiny",
        "prompt": ["Once upon", "Hello"],
        "n": 2,
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and "usage" in c for c in chunks)
    *text_chunks, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4 * 5
    finished = {}
    for c in text_chunks:
        assert c["usage"] is None and len(c["choices"]) == 1
        ch = c["choices"][0]
        assert set(ch) == {"index", "text", "logprobs", "finish_reason"}
        assert ch["index"] not in finished, "a chunk after the choice finished"
        if ch["finish_reason"] is not None:
            finished[ch["index"]] = ch["finish_reason"]
    assert finished == dict.fromkeys(range(4), "length")

    plain = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    kw = dict(model="tiny", prompt=["Once upon", "Hello"], n=2, max_tokens=5, temperature=0)
    full = plain.completions.create(**kw)
    texts, reasons, usage = [""] * 4, [None] * 4, None
    for chunk in plain.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            assert reasons[ch.index] is None
            texts[ch.index] += ch.text
            reasons[ch.index] = ch.finish_reason
    assert texts == [c.text for c in full.choices] and reasons == ["length"] * 4
    assert usage.completion_tokens == 20 and usage.prompt_tokens == full.usage.prompt_tokens


def test_extras_top_k_min_p_repetition_penalty(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        seed=1,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------ errors


def _too_long():
    return [{"role": "user", "content": "hello " * 300}]


BAD = [
    ("malformed json", b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, None),
    ("missing model", {"messages": [{"role": "user", "content": "x"}]}, 400, "model", None),
    ("missing messages", {"model": "tiny"}, 400, "messages", None),
    ("empty messages", chat_body(messages=[]), 400, "messages", None),
    ("messages type", chat_body(messages="hi"), 400, "messages", None),
    (
        "role",
        chat_body(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "messages[0].role",
        None,
    ),
    ("temperature type", chat_body(temperature="hot"), 400, "temperature", None),
    ("temperature range", chat_body(temperature=5), 400, "temperature", None),
    ("top_p range", chat_body(top_p=1.5), 400, "top_p", None),
    ("top_k negative", chat_body(top_k=-1), 400, "top_k", None),
    ("max_tokens zero", chat_body(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens limit", chat_body(max_tokens=10_000), 400, "max_tokens", None),
    (
        "max_completion_tokens",
        chat_body(max_completion_tokens=10_000),
        400,
        "max_completion_tokens",
        None,
    ),
    ("n limit", chat_body(n=50), 400, "n", None),
    ("n zero", chat_body(n=0), 400, "n", None),
    ("stop type", chat_body(stop=3), 400, "stop", None),
    ("too many stops", chat_body(stop=[f"s{i}" for i in range(17)]), 400, "stop", None),
    ("seed type", chat_body(seed=1.5), 400, "seed", None),
    ("seed range", chat_body(seed=-1), 400, "seed", None),
    ("empty stop", chat_body(stop=[""]), 400, "stop", None),
    (
        "content type",
        chat_body(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        None,
    ),
    ("stream type", chat_body(stream="yes"), 400, "stream", None),
    ("unknown model", chat_body(model="gpt-9"), 404, "model", "model_not_found"),
    ("context", chat_body(messages=_too_long()), 400, "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize(("name", "body", "status", "param", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_shaped_4xx(server, name, body, status, param, code):
    url = server.url + "/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    assert err["param"] == param, err
    if code:
        assert err["code"] == code


def test_completion_errors_and_unknown_route(server):
    url = server.url + "/v1/completions"
    r = httpx.post(url, json={"model": "tiny", "prompt": "hello " * 300})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["message"].startswith(
        "This model's maximum context length is 128 tokens. However, you requested "
    )
    r = httpx.post(url, json={"model": "tiny", "prompt": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_body_size_limit_413(server):
    big = chat_body(messages=[{"role": "user", "content": "x" * (LIMITS.max_body_bytes + 10)}])
    r = httpx.post(server.url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_openai_client_raises_typed_errors_and_server_keeps_serving(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_too_long())
    assert e.value.code == "context_length_exceeded"
    ok = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3
    )
    assert ok.choices[0].message.content is not None


def test_loading_gives_503_then_200(tiny):
    gate = threading.Event()

    def loader():
        gate.wait(30)
        return tiny

    srv = ServerThread(create_app(loader, model_id="tiny"))
    srv.thread.start()
    try:
        assert wait_until(lambda: srv.server.started)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert "retry-after" in r.headers
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body())
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        assert wait_until(lambda: httpx.get(srv.url + "/health").status_code == 200)
    finally:
        gate.set()
        srv.stop()


def test_api_key(tiny):
    with ServerThread(create_app(tiny, model_id="tiny", api_key="sekret")) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/").status_code == 200  # the page asks for the key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body())
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong").models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret")
        assert good.models.list().data[0].id == "tiny"


# ------------------------------------------------------------------ capacity


def test_queue_full_429_and_disconnects_free_places(tiny):
    app = create_app(tiny, model_id="tiny", max_batch=1, max_queue=1)
    with ServerThread(app) as srv:
        svc = srv.state.service
        slow_steps(srv.state, 0.05)  # 100 tokens take 5 s: requests stay in flight
        body = chat_body(temperature=0, max_tokens=100, stream=True)
        url = srv.url + "/v1/chat/completions"
        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
            ra = a.send(a.build_request("POST", url, json=body), stream=True)
            assert wait_until(lambda: svc.occupancy == (1, 0))
            rb = b.send(b.build_request("POST", url, json=body), stream=True)
            assert wait_until(lambda: svc.occupancy == (1, 1))
            full = httpx.post(url, json=body)
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_error"
            rb.close()  # a waiting client leaves
            assert wait_until(lambda: svc.occupancy == (1, 0), timeout=3)
            it = ra.iter_lines()
            assert next(it).startswith("data: ")
            t0 = time.time()
            ra.close()  # a running client leaves mid-stream
            assert wait_until(lambda: svc.occupancy == (0, 0), timeout=3)
            assert time.time() - t0 < 3  # well before its 100 tokens would be done
        # a non-streaming client that gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={**body, "stream": False}, timeout=0.5)
        assert wait_until(lambda: svc.occupancy == (0, 0), timeout=3)
        ok = httpx.post(url, json={**body, "stream": False, "max_tokens": 2})
        assert ok.status_code == 200


def test_32_concurrent_streams_are_batched_and_framed(server):
    svc = server.state.service
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], svc.occupancy[0])
            time.sleep(0.005)

    async def one(client: httpx.AsyncClient, i: int) -> list[str]:
        body = chat_body(
            messages=[{"role": "user", "content": f"Client {i} says hi"}],
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines()]
        return check_chat_stream(sse_events(lines), usage=True)

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    assert len(results) == 32
    assert peak[0] > 1, "concurrent requests should share the batch"
    assert svc.occupancy == (0, 0)


def test_a_repeated_prefix_is_reused_and_reported(client):
    system = "You are a careful assistant who answers about ships, harbours and the sea. " * 2
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
    msgs[-1]["content"] = "Hello again"
    second = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert (
        first.usage.prompt_tokens_details.cached_tokens
        <= second.usage.prompt_tokens_details.cached_tokens
    )


def test_a_huge_top_k_neither_fails_nor_breaks_later_requests(server):
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, json=chat_body(max_tokens=3, top_k=2**63 - 1, temperature=0.5), timeout=30)
    assert r.status_code in (200, 400), r.text
    ok = httpx.post(url, json=chat_body(max_tokens=3, temperature=0), timeout=30)
    assert ok.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


def test_health_is_503_and_says_why_when_the_engine_stopped(tiny):
    with ServerThread(create_app(tiny, model_id="tiny")) as srv:
        engine = srv.state.service.engine

        def broken(*args):
            raise SystemError("engine bookkeeping is corrupt")

        engine.step = broken
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body(max_tokens=3), timeout=30)
        assert r.status_code >= 500
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503
        assert "engine bookkeeping is corrupt" in health.json()["error"]
        again = httpx.post(srv.url + "/v1/chat/completions", json=chat_body(max_tokens=3))
        assert again.status_code == 503
