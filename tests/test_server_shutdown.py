"""Graceful shutdown: SIGTERM lets in-flight requests finish and refuses new ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from chatforge import load_model
from chatforge.cli.serve import _draining_server
from chatforge.server import create_app
from serverkit import ServerThread, free_port, slow_steps, wait_until

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out


def _stream_lines(url: str, body: dict, out: list, started) -> None:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        for line in r.iter_lines():
            out.append(line)
            started.set()


def test_draining_finishes_in_flight_and_refuses_new(tiny_llama_dir):
    import threading

    app = create_app(load_model(str(tiny_llama_dir)), model_id="tiny")
    srv = ServerThread(app, server_cls=lambda cfg: _draining_server(cfg, app.state.chatforge))
    srv.start()
    slow_steps(srv.state, 0.02)  # 60 tokens take > 1 s
    url = srv.url + "/v1/chat/completions"
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
        "max_tokens": 60,
        "stream": True,
    }
    lines: list[str] = []
    started = threading.Event()
    t = threading.Thread(target=_stream_lines, args=(url, body, lines, started))
    t.start()
    assert started.wait(30)
    # A keep-alive connection opened before the signal: its next request gets 503.
    with httpx.Client(timeout=10) as keep:
        assert keep.get(srv.url + "/health").status_code == 200
        srv.server.handle_exit(signal.SIGTERM, None)
        assert srv.state.draining
        try:  # refused: 503 if the request beats uvicorn closing idle connections
            r = keep.post(url, json={**body, "stream": False})
            assert r.status_code == 503, r.text
            assert "shutting down" in r.json()["error"]["message"]
        except httpx.TransportError:
            pass
    # New connections: refused once uvicorn closes its listener (it notices the signal
    # within its 0.1 s tick); one accepted just before that is still answered 503.
    deadline = time.monotonic() + 5
    while True:
        try:
            r = httpx.get(srv.url + "/health", timeout=2)
        except httpx.TransportError:
            break
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, "the server kept accepting new connections"
        time.sleep(0.05)
    t.join(60)
    srv.thread.join(30)
    assert not srv.thread.is_alive()
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert not srv.state.service._thread.is_alive()  # the engine was closed after draining


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_to_chatforge_serve(tiny_llama_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatforge",
            "serve",
            "--model",
            str(tiny_llama_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--allowed-host",
            "bot.lan",
            "--cors-origin",
            "http://app.example",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _healthy(base), timeout=60), "server did not start"
        # --allowed-host and --cors-origin reach the app.
        assert httpx.get(base + "/v1/models", headers={"Host": "bot.lan"}).status_code == 200
        assert httpx.get(base + "/v1/models", headers={"Host": "evil.example"}).status_code == 403
        r = httpx.get(base + "/v1/models", headers={"Origin": "http://app.example"})
        assert r.headers.get("access-control-allow-origin") == "http://app.example"
        r = httpx.get(base + "/v1/models", headers={"Origin": "http://other.example"})
        assert "access-control-allow-origin" not in r.headers
        body = {
            "model": str(tiny_llama_dir),
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0,
            "max_tokens": 100,
            "stream": True,
        }
        got: list[str] = []
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            got.append(next(it))
            proc.send_signal(signal.SIGTERM)
            got.extend(it)
        events = [line[6:] for line in got if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode()
    assert "Traceback" not in output, output


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.1)
        return False
