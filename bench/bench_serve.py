"""Serving throughput: aggregate tokens/s and time to first token at 1, 8 and 32 clients.

Starts ``chatforge serve`` in a subprocess on a loopback port (so the clients do
not compete with the engine thread for the GIL), waits for ``/health``, warms
up with one request, then for each concurrency level runs that many streaming
clients at once, each asking for one chat completion of at most
``--max-tokens`` tokens (greedy, distinct prompts). Reported per level:
aggregate completion tokens/s (all clients' tokens over the level's wall
time), mean and p95 time to first token, and each client's own tokens/s. The
ratio of aggregate tokens/s to the single-client figure is what continuous
batching buys.

    python bench/bench_serve.py --model smollm2 --levels 1 8 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe your ideal weekend in detail.",
    "What are some tips for learning to cook?",
    "Tell me about the history of the printing press.",
    "Why is the sky blue? Explain it to a child.",
    "Give me a packing list for a week of hiking.",
    "Describe a busy market in the morning.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int, quantize: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "chatforge", "serve", "--model", model, "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--quantize", quantize, "--log-level", "warning"]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


async def one_client(client: httpx.AsyncClient, base: str, model: str, i: int, max_tokens: int):
    """One streamed completion: (tokens, seconds, time to first token)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" (#{i})"}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices", []):
                if ttft is None and ch["delta"].get("content"):
                    ttft = time.perf_counter() - t0
    return tokens, time.perf_counter() - t0, ttft


async def run_level(base: str, model: str, clients: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(one_client(client, base, model, i, max_tokens) for i in range(clients))
        )
        wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    ttfts = sorted(r[2] for r in results if r[2] is not None)
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))] if ttfts else None
    return {
        "clients": clients,
        "completion_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "aggregate_tokens_per_second": round(tokens / wall, 2),
        "ttft_mean_seconds": round(statistics.mean(ttfts), 3) if ttfts else None,
        "ttft_p95_seconds": round(p95, 3) if p95 is not None else None,
        "per_client_tokens_per_second": round(
            statistics.mean(r[0] / r[1] for r in results if r[1] > 0), 2
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64, help="reply limit per client")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--quantize", default="auto", help="serve --quantize: none, int8, int4, auto")
    ap.add_argument("--out", default="bench/results/serve.json", help="JSON results file")
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args.model, port, args.max_batch, args.quantize)
    try:
        wait_ready(base, proc)
        asyncio.run(run_level(base, args.model, 1, 8))  # warm-up: first-call costs
        levels = []
        for n in args.levels:
            level = asyncio.run(run_level(base, args.model, n, args.max_tokens))
            print(json.dumps(level), flush=True)
            levels.append(level)
    finally:
        proc.terminate()
        proc.wait(60)
    single = next((lv for lv in levels if lv["clients"] == 1), None)
    if single:
        for lv in levels:
            lv["speedup_vs_1"] = round(
                lv["aggregate_tokens_per_second"] / single["aggregate_tokens_per_second"], 2
            )
    result = {
        "benchmark": "serve",
        "model": args.model,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "quantize": args.quantize,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_at_end": os.getloadavg(),
        "levels": levels,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
