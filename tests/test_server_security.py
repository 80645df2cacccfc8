"""The server against hostile input: no 5xx for anything a client sends, browser attacks
on a keyless local server (DNS rebinding, cross-site form posts, CORS), slow bodies and
work that would stall the event loop."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import threading
import time
import warnings

import httpx
import pytest

from chatforge import load_model
from chatforge.server import Limits, create_app, transport
from chatforge.server.errors import APIError
from chatforge.server.routes import chat as chat_route
from serverkit import ServerThread, wait_until

LIMITS = Limits(max_tokens=8, max_n=4, max_body_bytes=256 * 1024)
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def server(tiny):
    with ServerThread(create_app(tiny, model_id="tiny", limits=LIMITS, body_timeout=1.0)) as srv:
        yield srv


def chat(**kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    body.update(kw)
    return body


def comp(**kw):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    body.update(kw)
    return body


def post(srv, path, body, headers=JSON, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, headers=headers, timeout=30, **kw)


def error_of(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"]
    return err


# ------------------------------------------------------------- 1. never 5xx to input

DEEP = 100_000


@pytest.mark.parametrize(
    "body",
    [
        b"[" * DEEP + b"]" * DEEP,
        b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
        b'{"model": "tiny", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    ],
    ids=["array", "object", "in-field"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_deeply_nested_json_is_a_400(server, path, body):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "invalid_json" or err["param"], err


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", '"prompt": "\\ud800"', "prompt"),
        ("/v1/completions", '"prompt": ["ok", "a\\udfffb"]', "prompt[1]"),
        ("/v1/completions", '"prompt": "Hi", "stop": ["\\ud800"]', "stop[0]"),
        ("/v1/completions", '"prompt": "Hi", "user": {"\\ud800": 1}', "user"),
        (
            "/v1/chat/completions",
            '"messages": [{"role": "user", "content": "\\ud800"}]',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            '"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udc00"}]}]',
            "messages[0].content[0].text",
        ),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(server, path, raw, param):
    r = post(server, path, ('{"model": "tiny", "max_tokens": 2, ' + raw + "}").encode())
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param
    assert "surrogate" in err["message"]


HUGE = 10**40
# Every route with malformed input of every kind: (path, body). None of it may get a 5xx.
MALFORMED = [
    ("/v1/chat/completions", b""),
    ("/v1/chat/completions", b"null"),
    ("/v1/chat/completions", b"[]"),
    ("/v1/chat/completions", b'"text"'),
    ("/v1/chat/completions", b"1e999999"),
    ("/v1/chat/completions", b"NaN"),
    ("/v1/chat/completions", b"\xff\xfe\x00"),
    (
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}',
    ),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [], }'),
    ("/v1/chat/completions", b"9" * 5000),
    ("/v1/chat/completions", chat(model=None)),
    ("/v1/chat/completions", chat(model=5)),
    ("/v1/chat/completions", chat(model="nope")),
    ("/v1/chat/completions", chat(model="")),
    ("/v1/chat/completions", chat(messages=None)),
    ("/v1/chat/completions", chat(messages=[])),
    ("/v1/chat/completions", chat(messages={})),
    ("/v1/chat/completions", chat(messages="Hi")),
    ("/v1/chat/completions", chat(messages=[None])),
    ("/v1/chat/completions", chat(messages=[[]])),
    ("/v1/chat/completions", chat(messages=[{}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user"}])),
    ("/v1/chat/completions", chat(messages=[{"role": "tool", "content": "x"}])),
    ("/v1/chat/completions", chat(messages=[{"role": None, "content": "x"}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": None}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": ""}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": []}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{}]}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image"}]}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": {"a": 1}}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "\x00\x01"}])),
    ("/v1/chat/completions", chat(messages=[{"role": "assistant", "content": "x"}])),
    ("/v1/chat/completions", chat(messages=[{"role": "system", "content": "x"}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x" * 200_000}])),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "Hi"}] * 3000)),
    ("/v1/chat/completions", chat(temperature=-1)),
    ("/v1/chat/completions", chat(temperature=HUGE)),
    ("/v1/chat/completions", chat(temperature="1")),
    ("/v1/chat/completions", chat(temperature=None)),
    ("/v1/chat/completions", chat(top_p=-0.5)),
    ("/v1/chat/completions", chat(top_p=HUGE)),
    ("/v1/chat/completions", chat(top_p=0)),
    ("/v1/chat/completions", chat(top_k=-1)),
    ("/v1/chat/completions", chat(top_k=HUGE)),
    ("/v1/chat/completions", chat(top_k=1.5)),
    ("/v1/chat/completions", chat(min_p=-1)),
    ("/v1/chat/completions", chat(min_p=2)),
    ("/v1/chat/completions", chat(repetition_penalty=0)),
    ("/v1/chat/completions", chat(repetition_penalty=-1)),
    ("/v1/chat/completions", chat(repetition_penalty=HUGE)),
    ("/v1/chat/completions", chat(max_tokens=0)),
    ("/v1/chat/completions", chat(max_tokens=-5)),
    ("/v1/chat/completions", chat(max_tokens=HUGE)),
    ("/v1/chat/completions", chat(max_tokens="2")),
    ("/v1/chat/completions", chat(max_tokens=2.5)),
    ("/v1/chat/completions", chat(max_tokens=True)),
    ("/v1/chat/completions", chat(max_completion_tokens=-1)),
    ("/v1/chat/completions", chat(max_completion_tokens=HUGE)),
    ("/v1/chat/completions", chat(n=0)),
    ("/v1/chat/completions", chat(n=-1)),
    ("/v1/chat/completions", chat(n=HUGE)),
    ("/v1/chat/completions", chat(n=None)),
    ("/v1/chat/completions", chat(seed=HUGE)),
    ("/v1/chat/completions", chat(seed=-HUGE)),
    ("/v1/chat/completions", chat(seed=2**64 - 1, n=2)),
    ("/v1/chat/completions", chat(seed=1.5)),
    ("/v1/chat/completions", chat(stop=5)),
    ("/v1/chat/completions", chat(stop=[])),
    ("/v1/chat/completions", chat(stop=[None])),
    ("/v1/chat/completions", chat(stop=[""])),
    ("/v1/chat/completions", chat(stop=["a"] * 50)),
    ("/v1/chat/completions", chat(stop="x" * 100_000)),
    ("/v1/chat/completions", chat(stream=None)),
    ("/v1/chat/completions", chat(stream=1)),
    ("/v1/chat/completions", chat(stream_options=5)),
    ("/v1/chat/completions", chat(stream_options={"include_usage": "yes"})),
    ("/v1/chat/completions", chat(stream=True, stream_options={"include_usage": None})),
    ("/v1/chat/completions", chat(presence_penalty=HUGE)),
    ("/v1/chat/completions", chat(frequency_penalty="x")),
    ("/v1/chat/completions", chat(logprobs=True)),
    ("/v1/chat/completions", chat(logprobs=5)),
    ("/v1/chat/completions", chat(user=[1, 2, {"a": None}])),
    ("/v1/completions", b"null"),
    ("/v1/completions", b"[1, 2]"),
    ("/v1/completions", b"{"),
    ("/v1/completions", comp(model=None)),
    ("/v1/completions", comp(model="nope")),
    ("/v1/completions", comp(prompt=None)),
    ("/v1/completions", comp(prompt="")),
    ("/v1/completions", comp(prompt=[])),
    ("/v1/completions", comp(prompt=[""])),
    ("/v1/completions", comp(prompt=[None])),
    ("/v1/completions", comp(prompt=[1, 2, 3])),
    ("/v1/completions", comp(prompt=[[1, 2]])),
    ("/v1/completions", comp(prompt={"a": 1})),
    ("/v1/completions", comp(prompt=5)),
    ("/v1/completions", comp(prompt=["a"] * 100)),
    ("/v1/completions", comp(prompt="x" * 200_000)),
    ("/v1/completions", comp(prompt="\x00")),
    ("/v1/completions", comp(max_tokens=None)),
    ("/v1/completions", comp(max_tokens=0)),
    ("/v1/completions", comp(max_tokens=-(2**70))),
    ("/v1/completions", comp(n=HUGE)),
    ("/v1/completions", comp(n=4, prompt=["a", "b"])),
    ("/v1/completions", comp(echo=True)),
    ("/v1/completions", comp(echo="x")),
    ("/v1/completions", comp(logprobs=3)),
    ("/v1/completions", comp(logprobs=-1)),
    ("/v1/completions", comp(seed=HUGE)),
    ("/v1/completions", comp(temperature=float("inf"))),
    ("/v1/completions", b'{"model": "tiny", "prompt": "Hi", "temperature": Infinity}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "Hi", "top_p": NaN}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "Hi", "seed": 1' + b"0" * 5000 + b"}"),
    ("/v1/completions", comp(stop=["a", None])),
]


@pytest.mark.parametrize(("path", "body"), MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_input_never_gets_a_5xx(server, path, body):
    r = post(server, path, body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error_of(r)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models/nope"),
        ("GET", "/v1/models/" + "x" * 5000),
        ("GET", "/v1/models/%ff%fe"),
        ("GET", "/v1/models/%00"),
        ("GET", "/v1/models/%ed%a0%80"),
        ("GET", "/v1/nothing"),
        ("POST", "/v1/models"),
        ("DELETE", "/v1/chat/completions"),
        ("GET", "/v1/completions"),
        ("PUT", "/health"),
        ("POST", "/"),
    ],
)
def test_odd_routes_and_methods_never_get_a_5xx(server, method, path):
    r = httpx.request(method, server.url + path, headers=JSON, content=b"{}")
    assert 400 <= r.status_code < 500, r.text


# ------------------------------------------------------------- 2. browser attacks


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:80", "127.0.0.1.nip.io"])
def test_other_host_headers_get_403(server, host):
    for method, path in [("GET", "/"), ("GET", "/v1/models"), ("POST", "/v1/completions")]:
        r = httpx.request(method, server.url + path, headers={"host": host, **JSON}, content=b"{}")
        assert r.status_code == 403, (path, r.text)
        assert "host" in error_of(r)["message"].lower()


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:8000", "127.0.0.1", "127.0.0.1:1234", "[::1]", "[::1]:80"]
)
def test_local_host_headers_are_allowed(server, host):
    r = httpx.get(server.url + "/v1/models", headers={"host": host})
    assert r.status_code == 200, r.text


def test_allowed_hosts_extends_or_opens_the_list(tiny):
    app = create_app(tiny, model_id="tiny", allowed_hosts=["chat.example.com"])
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/health", headers={"host": "chat.example.com"}).is_success
        assert httpx.get(srv.url + "/health", headers={"host": "localhost"}).is_success
        assert httpx.get(srv.url + "/health", headers={"host": "evil.com"}).status_code == 403
    with ServerThread(create_app(tiny, model_id="tiny", allowed_hosts=["*"])) as srv:
        assert httpx.get(srv.url + "/health", headers={"host": "evil.com"}).is_success


def test_the_address_a_connection_came_in_on_is_an_allowed_host():
    """Bound to 0.0.0.0, a client using the machine's address (or a health probe using the
    pod's IP) is served; a name that merely resolves there is not."""
    from chatforge.server.guard import HostGuard

    guard = HostGuard(None, allowed_hosts=["Chat.Example.com."])
    scope = {"server": ("10.1.2.3", 8000)}
    assert guard.allows("10.1.2.3:8000", scope)
    assert guard.allows("chat.example.com:8000", scope)
    assert guard.allows("", scope)  # no Host at all: HTTP/1.0, never a browser
    assert not guard.allows("rebind.example.com:8000", scope)
    assert not guard.allows("10.1.2.4:8000", scope)
    assert not guard.allows("10.1.2.3.evil.com", scope)


@pytest.mark.parametrize(
    "ctype",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        None,
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_non_json_content_types_get_415(server, path, ctype):
    body = json.dumps(chat() if "chat" in path else comp()).encode()
    headers = {} if ctype is None else {"content-type": ctype}
    r = httpx.post(server.url + path, content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert "application/json" in error_of(r)["message"]


@pytest.mark.parametrize(
    "ctype",
    ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"],
)
def test_json_content_types_are_accepted(server, ctype):
    r = post(server, "/v1/completions", comp(), headers={"content-type": ctype})
    assert r.status_code == 200, r.text


def test_cors_is_off_by_default(server):
    origin = {"origin": "https://evil.example.com"}
    r = httpx.get(server.url + "/v1/models", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(
        server.url + "/v1/chat/completions",
        headers={**origin, "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in pre.headers


def test_cors_origins_allows_only_those(tiny):
    app = create_app(tiny, model_id="tiny", api_key="k", cors_origins=["https://app.example"])
    with ServerThread(app) as srv:
        good, bad = {"origin": "https://app.example"}, {"origin": "https://evil.example"}
        want = {
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        }
        # The preflight carries no API key; it must pass the key check.
        pre = httpx.options(srv.url + "/v1/chat/completions", headers={**good, **want})
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        pre = httpx.options(srv.url + "/v1/chat/completions", headers={**bad, **want})
        assert pre.headers.get("access-control-allow-origin") != "https://evil.example"
        auth = {"authorization": "Bearer k"}
        r = httpx.get(srv.url + "/v1/models", headers={**good, **auth})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.get(srv.url + "/v1/models", headers={**bad, **auth})
        assert "access-control-allow-origin" not in r.headers
        assert httpx.get(srv.url + "/v1/models", headers=good).status_code == 401


def test_the_chat_page_still_posts_json(server):
    page = httpx.get(server.url + "/static/chat.js")
    assert page.status_code == 200
    assert '"Content-Type": "application/json"' in page.text
    r = post(server, "/v1/chat/completions", chat(stream=True))
    assert r.status_code == 200 and "data: [DONE]" in r.text


# ------------------------------------------------------------- 3. slow bodies, stalls


def _raw(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head)
    return s


@pytest.mark.slow  # waits on timers
def test_a_stalled_body_gets_408(server):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    with _raw(server.port, head) as s:
        t0 = time.monotonic()
        reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert 0.8 < time.monotonic() - t0 < 5


@pytest.mark.slow  # waits on timers
def test_a_trickled_body_gets_408(server):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with _raw(server.port, head) as s:
        t0 = time.monotonic()
        s.settimeout(0.2)
        reply = b""
        while not reply and time.monotonic() - t0 < 5:
            try:
                s.sendall(b" ")
                reply = s.recv(65536)
            except TimeoutError:
                continue
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert time.monotonic() - t0 < 3


def test_a_client_gone_mid_body_logs_one_line(server):
    """One log line, no traceback (uvicorn's own logger does not propagate: listen to it)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "chatforge.server", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        s = _raw(server.port, head)
        time.sleep(0.2)
        s.close()
        assert wait_until(lambda: any("mid-body" in r.getMessage() for r in records), 5)
        time.sleep(0.3)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert [r for r in records if "mid-body" in r.getMessage()][0].levelno == logging.INFO
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]
    assert not [r for r in records if r.levelno >= logging.ERROR]


def _loop_latency_during(srv, send) -> float:
    """The slowest /health answer while ``send()`` runs in another thread."""
    t = threading.Thread(target=send)
    t.start()
    worst = 0.0
    time.sleep(0.05)
    while t.is_alive():
        t0 = time.monotonic()
        httpx.get(srv.url + "/health", timeout=10)
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.02)
    t.join()
    return worst


@pytest.mark.slow  # waits on timers
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_prompt_rendering_runs_off_the_event_loop(tiny, monkeypatch, path):
    """Tokenising / templating a big prompt must not stall other requests."""
    real_encode, real_plan = tiny.tokenizer.encode, chat_route.plan_request
    # Each stalls 1.5 s: on the loop, a /health poll would wait ~1.4 s; off it, polls
    # took up to 0.5 s with the suite's other process holding both cores.
    stall = 1.5

    def slow_encode(*a, **kw):
        time.sleep(stall)
        return real_encode(*a, **kw)

    def slow_plan(*a, **kw):
        time.sleep(stall)
        return real_plan(*a, **kw)

    monkeypatch.setattr(tiny.tokenizer, "encode", slow_encode)
    monkeypatch.setattr(chat_route, "plan_request", slow_plan)
    with ServerThread(create_app(tiny, model_id="tiny", limits=LIMITS)) as srv:
        body = chat() if "chat" in path else comp()
        worst = _loop_latency_during(srv, lambda: post(srv, path, body))
    assert worst < 1.0, f"the event loop stalled for {worst:.2f}s"


@pytest.mark.slow  # waits on timers
def test_collect_leaves_no_unretrieved_exceptions(tiny):
    """A failed choice among several: the others are cancelled, no exception is orphaned."""
    from chatforge.generation.types import Completion, StreamEvent

    class FakeHandle:
        def __init__(self, mode: str) -> None:
            self.mode, self.cancelled = mode, False

        async def aevents(self):
            if self.mode == "error":  # the engine failed this choice
                await asyncio.sleep(0.01)
                c = Completion("", [], "error", 1, 0, 0.0, error="boom")
                yield StreamEvent(index=0, text="", completion=c)
            elif self.mode == "raise":  # fails a little later
                await asyncio.sleep(0.05)
                raise RuntimeError("second failure")
            else:
                await asyncio.sleep(30)
                yield None

        def cancel(self) -> None:
            self.cancelled = True

    class FakeRequest:
        def __init__(self, gone: bool = False) -> None:
            self.gone = gone

        async def is_disconnected(self) -> bool:
            return self.gone

    seen: list = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: seen.append(ctx))
        handles = [FakeHandle("error"), FakeHandle("raise")]
        with pytest.raises(APIError) as e:
            await transport.collect(handles, FakeRequest())
        assert e.value.status == 500
        assert handles[1].cancelled  # the choice still running is stopped
        # The client goes away while both choices run: both are stopped, nothing leaks.
        handles = [FakeHandle("slow"), FakeHandle("slow")]
        with pytest.raises(APIError) as e:
            await transport.collect(handles, FakeRequest(gone=True))
        assert e.value.status == 499
        assert all(h.cancelled for h in handles)
        await asyncio.sleep(0.1)
        gc.collect()
        await asyncio.sleep(0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncio.run(main())
    gc.collect()
    assert not seen, seen
