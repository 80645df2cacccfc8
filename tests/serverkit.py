"""Run a chatforge app with uvicorn in a thread on a free loopback port (for tests)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``with ServerThread(app) as srv:`` serves ``app`` at ``srv.url`` until the block ends."""

    def __init__(self, app, server_cls=uvicorn.Server, **config) -> None:
        self.app = app
        self.port = free_port()
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **config)
        self.server = server_cls(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        return self.app.state.chatforge

    def start(self, ready_timeout: float = 120.0) -> ServerThread:
        self.thread.start()
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.state.status == "error":
                raise RuntimeError(self.state.error)
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def slow_steps(state, seconds: float) -> None:
    """Make every decode step take at least ``seconds`` (so requests stay in flight)."""
    engine = state.service.engine
    step = engine.step

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return step(*args, **kwargs)

    engine.step = slow


def wait_until(cond, timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()
