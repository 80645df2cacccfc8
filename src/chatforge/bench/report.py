"""Running the decode benchmark's settings and reporting them: table, JSON, PNG."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from chatforge.bench.decode import BenchSetting

DEFAULT_SETTINGS = [
    BenchSetting("transformers", "fp32"),
    BenchSetting("chatforge", "fp32"),
    BenchSetting("chatforge", "bf16"),
    BenchSetting("chatforge", "fp32", "gguf"),
    BenchSetting("chatforge", "fp32", "int8"),
    BenchSetting("chatforge", "bf16", "int8"),
    BenchSetting("chatforge", "fp32", "int4"),
    BenchSetting("chatforge", "bf16", "int4"),
    BenchSetting("llama.cpp", "gguf", "q4_1"),
]


def machine() -> dict[str, Any]:
    import torch

    from chatforge.models.fast.native import kernel_path

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mem_mb": mem,
        "kernels": kernel_path(),  # which CPU kernels chatforge's settings run on
    }


def run_setting(
    setting: BenchSetting,
    model: str,
    new_tokens: int,
    batch_tokens: int,
    batches: tuple[int, ...],
    gguf: str | None,
) -> list[dict]:
    """Measure a setting in a fresh process; its printed RESULT line is parsed."""
    spec = {
        "setting": asdict(setting),
        "model": model,
        "new_tokens": new_tokens,
        "batch_tokens": batch_tokens,
        "batches": list(batches),
        "gguf": gguf,
    }
    p = subprocess.run(
        [sys.executable, "-m", "chatforge.bench.worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark of {setting} failed: {p.stderr.strip()[-500:]}")


# The figures a round measures, whose median over the rounds is reported.
ROUND_FIGURES = ("prefill_tok_s", "ttft_ms", "decode_tok_s")


def run_rounds(
    settings: list[BenchSetting],
    rounds: int,
    run: Any,
    on_error: Any = None,
) -> list[dict]:
    """Every setting measured ``rounds`` times, interleaved (round 1 of each setting, then
    round 2 of each, ...), each in a fresh process (``run(setting)`` returns its result
    rows), so a machine that gets busier or quieter meanwhile touches every setting alike.
    Per setting and batch: the median of each figure (NaN: not measured that round), with
    its min, max and all values
    (``<figure>_min``, ``<figure>_max``, ``<figure>_rounds``) and ``rounds``, the count.
    ``on_error(setting, exc)`` is told of a failed run (RuntimeError); that round of that
    setting is left out."""
    import statistics

    seen: dict[tuple, list[dict]] = {}
    for _ in range(max(1, rounds)):
        for s in settings:
            try:
                rows = run(s)
            except RuntimeError as e:
                if on_error is None:
                    raise
                on_error(s, e)
                continue
            for r in rows:
                seen.setdefault((label(r), r["batch"]), []).append(r)
    results = []
    for runs in seen.values():
        row = dict(runs[-1])  # peak RSS, threads, kernels: the last round's
        for key in ROUND_FIGURES:
            values = [r[key] for r in runs if r.get(key) is not None and r[key] == r[key]]
            if not values:
                continue
            row[key] = statistics.median(values)
            row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
            row[f"{key}_rounds"] = values
        row["rounds"] = len(runs)
        results.append(row)
    return results


def _spread(r: dict, key: str, fmt: str) -> str:
    """A figure's median, with its min-max over the rounds when there were several."""
    if r.get(key) is None:
        return ""
    text = format(r[key], fmt)
    if r.get("rounds", 1) > 1 and f"{key}_min" in r:
        text += f" ({format(r[key + '_min'], fmt)}-{format(r[key + '_max'], fmt)})"
    return text


def baseline(results: list[dict]) -> dict | None:
    return next(
        (
            r
            for r in results
            if r["engine"] == "transformers" and r["dtype"] == "fp32" and r["batch"] == 1
        ),
        None,
    )


def label(r: dict) -> str:
    if r["engine"] == "transformers":
        return f"transformers {r['dtype']}"
    if r["engine"] == "llama.cpp":
        return f"llama.cpp {r['quantize']}"
    q = "" if r["quantize"] == "none" else f" {r['quantize']}"
    return f"chatforge {r['dtype']}{q}"


def print_table(results: list[dict], quality: list[dict] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    base = baseline(results)
    b1 = base["decode_tok_s"] if base else None
    rounds = max((r.get("rounds", 1) for r in results), default=1)
    title = "Decode benchmark (ratios: vs transformers fp32 at batch 1)"
    if rounds > 1:
        title += f"; median (min-max) of {rounds} interleaved rounds"
    table = Table(title=title)
    for col in (
        "setting",
        "batch",
        "prefill tok/s",
        "TTFT ms",
        "decode tok/s",
        "x baseline",
        "peak RSS MB",
    ):
        table.add_column(col, justify="right" if col != "setting" else "left")
    for r in results:
        table.add_row(
            label(r),
            str(r["batch"]),
            _spread(r, "prefill_tok_s", ".0f"),
            _spread(r, "ttft_ms", ".0f"),
            _spread(r, "decode_tok_s", ".1f"),
            f"{r['decode_tok_s'] / b1:.1f}x" if b1 else "",
            f"{r['peak_rss_mb']:.0f}",
        )
    console = Console()
    console.print(table)
    if quality:
        q = Table(title="Quality check: perplexity on a chitchat sample (assistant tokens)")
        for col in ("weights", "perplexity", "change vs fp32", "allowed", "passes"):
            q.add_column(col)
        for row in quality:
            q.add_row(
                row["quantize"],
                f"{row['perplexity']:.3f}",
                f"{row['change'] * 100:+.2f}%",
                f"{row['allowed'] * 100:.0f}%",
                "yes" if row["passes"] else "NO",
            )
        console.print(q)


def markdown_table(results: list[dict]) -> str:
    """The same table as Markdown, for the README."""
    base = baseline(results)
    b1 = base["decode_tok_s"] if base else None
    lines = [
        "| setting | batch | prefill tok/s | TTFT ms | decode tok/s | x transformers fp32 b1 "
        "| peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        prefill, ttft = _spread(r, "prefill_tok_s", ".0f"), _spread(r, "ttft_ms", ".0f")
        decode = _spread(r, "decode_tok_s", ".1f")
        ratio = f"{r['decode_tok_s'] / b1:.1f}x" if b1 else ""
        lines.append(
            f"| {label(r)} | {r['batch']} | {prefill} | {ttft} | {decode} "
            f"| {ratio} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def write_png(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for r in results:
        if label(r) not in labels:
            labels.append(label(r))
    batches = sorted({r["batch"] for r in results})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(batches)
    for j, b in enumerate(batches):
        vals = [
            next((r["decode_tok_s"] for r in results if label(r) == lab and r["batch"] == b), 0.0)
            for lab in labels
        ]
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=f"batch {b}")
    ax.set_xticks(
        [i + width * (len(batches) - 1) / 2 for i in range(len(labels))],
        labels,
        rotation=20,
        ha="right",
    )
    ax.set_ylabel("decode tokens/s (batch total)")
    ax.set_yscale("log")
    ax.set_title("chatforge decode speed, SmolLM2-135M, same prompts, one run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
