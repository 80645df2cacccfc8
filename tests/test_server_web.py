"""The web chat page, driven in headless Chromium over the DevTools protocol."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from chatforge import load_model
from chatforge.server import create_app
from serverkit import ServerThread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Page:
    """The smallest CDP client: evaluate JavaScript in one page over its websocket."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(ws_url, max_size=None, open_timeout=30))
        self.ids = itertools.count(1)

    def eval(self, expression: str):
        msg_id = next(self.ids)
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        self.ws.send(json.dumps({"id": msg_id, "method": "Runtime.evaluate", "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                result = msg["result"]
                if "exceptionDetails" in result:
                    raise AssertionError(result["exceptionDetails"])
                return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = self.eval(expression)
            except AssertionError:  # e.g. the page is still loading
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self.stack.close()


@pytest.fixture()
def browser_page(tiny_llama_dir, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does it)")
    srv = ServerThread(create_app(load_model(str(tiny_llama_dir)), model_id="tiny")).start()
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            srv.url + "/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    page = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.time() < deadline, "chromium did not open its debugging port"
            assert proc.poll() is None, "chromium exited"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        target = None
        while target is None:
            assert time.time() < deadline, "chromium did not open the page"
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            target = next(
                (t for t in targets if t["type"] == "page" and t["url"].startswith(srv.url)), None
            )
            time.sleep(0.1)
        page = Page(target["webSocketDebuggerUrl"])
        yield page, srv
    finally:
        if page is not None:
            page.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        srv.stop()


def test_web_chat_streams_a_reply(browser_page):
    page, srv = browser_page
    page.wait_for("document.getElementById('status').textContent.startsWith('model: tiny')")
    page.eval(
        """
        const set = (id, v) => { const el = document.getElementById(id); el.value = v;
                                  el.dispatchEvent(new Event('input')); };
        const preset = document.getElementById('preset');
        preset.value = 'precise'; preset.dispatchEvent(new Event('change'));
        set('system', 'You are a test.'); set('max-tokens', '12');
        set('input', 'Hello page');
        document.getElementById('form').requestSubmit();
        true
        """
    )
    page.wait_for("document.querySelector('.msg.assistant.done') !== null")
    user = page.eval("document.querySelector('.msg.user').textContent")
    reply = page.eval("document.querySelector('.msg.assistant').firstChild.textContent")
    meta = page.eval("document.querySelector('.msg.assistant .meta').textContent")
    assert user == "Hello page"
    assert "12 tokens" in meta
    # The page sent the system prompt, temperature and max tokens: same reply as the API.
    expected = httpx.post(
        srv.url + "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "You are a test."},
                {"role": "user", "content": "Hello page"},
            ],
            "temperature": 0,
            "max_tokens": 12,
        },
    ).json()["choices"][0]["message"]["content"]
    assert reply and reply == expected
    # New chat clears the conversation.
    page.eval("document.getElementById('new-chat').click(); true")
    assert page.eval("document.querySelectorAll('.msg').length") == 0


def test_the_page_starts_from_the_cli_preset_and_sends_every_knob(browser_page):
    # Regression: the page sent its own defaults (temperature 0.7, top-p 0.9, no min-p or
    # penalty), not the balanced preset of chat/generate.
    from chatforge.generation.config import DEFAULT_PRESET, GenerationConfig

    page, srv = browser_page
    page.wait_for("document.getElementById('status').textContent.startsWith('model: tiny')")
    preset = GenerationConfig.default()
    shown = page.eval(
        """({preset: document.getElementById('preset').value,
             t: document.getElementById('temperature').value,
             p: document.getElementById('top-p').value,
             minp: document.getElementById('min-p').value,
             k: document.getElementById('top-k').value,
             rep: document.getElementById('repetition-penalty').value,
             label: document.getElementById('min-p-value').textContent})"""
    )
    assert shown["preset"] == DEFAULT_PRESET
    assert float(shown["t"]) == preset.temperature and float(shown["p"]) == preset.top_p
    assert float(shown["minp"]) == preset.min_p == float(shown["label"])
    assert int(shown["k"]) == preset.top_k
    assert float(shown["rep"]) == preset.repetition_penalty
    # What it sends: capture the request body the page posts.
    body = page.eval(
        """
        window.__sent = null;
        const real = window.fetch;
        window.fetch = (url, opts) => {
          if (String(url).endsWith('/v1/chat/completions')) window.__sent = JSON.parse(opts.body);
          return real(url, opts);
        };
        document.getElementById('max-tokens').value = '3';
        document.getElementById('input').value = 'hi';
        document.getElementById('form').requestSubmit();
        true
        """
    )
    assert body is True
    sent = page.wait_for("window.__sent")
    assert sent["temperature"] == preset.temperature and sent["top_p"] == preset.top_p
    assert sent["min_p"] == preset.min_p and sent["top_k"] == preset.top_k
    assert sent["repetition_penalty"] == preset.repetition_penalty
    # Another preset fills every knob, switching off what it does not set.
    page.wait_for("document.querySelector('.msg.assistant.done') !== null")
    page.eval(
        "const p = document.getElementById('preset'); p.value = 'precise';"
        "p.dispatchEvent(new Event('change')); true"
    )
    assert float(page.eval("document.getElementById('temperature').value")) == 0.0
    assert float(page.eval("document.getElementById('repetition-penalty').value")) == 1.0
