"""The README's screenshot of the web workbench in compare mode (docs/images/compare.png).

    python tools/screenshot_workbench.py [--model smollm2] [--out docs/images/compare.png]

Starts ``chatforge serve``, opens its page in Debian's Chromium through Playwright
(``pip install -e .[dev]``; no browser download), sends one prompt to two columns (the
default preset, and the creative preset with a seed), picks the first reply and saves
the page.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

PROMPT = "How do I reverse a list in Python? One short example."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", type=Path, default=Path("docs/images/compare.png"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "chatforge", "serve", "-m", args.model, "-p", str(port)]
    # The pick it makes goes to a conversation log of its own, not the user's.
    env = {**os.environ, "CHATFORGE_DATA": tempfile.mkdtemp(prefix="chatforge-shot-")}
    server = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            # bypass_csp: Playwright's waits evaluate strings, which the page's policy forbids
            page = browser.new_page(viewport={"width": 1280, "height": 760}, bypass_csp=True)
            page.goto(url + "/")
            page.wait_for_selector("#status:not(.error)")
            page.wait_for_function("document.querySelectorAll('#model option').length > 0")
            page.fill("#system", "You are a concise programming assistant.")
            page.fill("#max-tokens", "120")
            page.click("#add-column")  # B: a copy of A's settings, then the creative preset
            page.select_option("#preset", "creative")
            page.fill("#seed", "42")
            page.fill("#input", PROMPT)
            page.press("#input", "Enter")
            page.wait_for_selector(".turn.done", timeout=300_000)
            page.click("text=Pick A")
            page.wait_for_function(
                "/saved/.test(document.querySelector('.reply.chosen .note').textContent)"
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
