"""`chatforge serve` on an address it cannot listen on: one line, before the model load."""

from __future__ import annotations

import socket
import time

import pytest

import chatforge.models
from cli_helpers import run


@pytest.fixture()
def no_load(monkeypatch):
    """Fail the test's point loudly if serve got as far as loading the model."""
    loads: list[str] = []

    def load_model(*args, **kwargs):
        loads.append(str(args))
        raise AssertionError("the model was loaded before the address was checked")

    monkeypatch.setattr(chatforge.models, "load_model", load_model)
    return loads


def test_port_in_use_is_one_line_before_the_model_load(capsys, no_load, tiny_llama_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.perf_counter()
        argv = ["serve", "--port", str(port), "--model", str(tiny_llama_dir)]
        code, out, err = run(argv, capsys)
        seconds = time.perf_counter() - t0
    assert code != 0, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in err
    assert "--port" in err
    assert not no_load and seconds < 5


def test_bad_host_is_one_line(capsys, no_load, tiny_llama_dir):
    argv = ["serve", "--host", "no-such-host.invalid", "--model", str(tiny_llama_dir)]
    code, _, err = run(argv, capsys)
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "cannot listen on --host no-such-host.invalid" in err
    assert not no_load
