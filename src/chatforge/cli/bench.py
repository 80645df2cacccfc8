"""``chatforge bench``: decode speed of each engine setting against transformers, in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Benchmarks (decode speed by default).")


@app.callback(invoke_without_command=True)
def bench_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="Model to measure.")] = "smollm2",
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the results here as JSON.")
    ] = None,
    png: Annotated[
        Path | None, typer.Option("--png", help="Write a chart here (default: next to --json).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer tokens and batch sizes (a smoke run).")
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Measure only these settings, e.g. 'chatforge fp32 int8'."),
    ] = None,
    quality: Annotated[
        bool, typer.Option("--quality/--no-quality", help="Perplexity check of int8/int4.")
    ] = True,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads per setting (default: all).")
    ] = None,
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds",
            min=1,
            help="Measure every setting this many times, interleaved; report the median (min-max).",
        ),
    ] = 1,
    batch: Annotated[
        list[int] | None,
        typer.Option("--batch", help="Batch sizes to decode (default: 1, 8, 32; --quick: 1, 8)."),
    ] = None,
) -> None:
    """Measure transformers fp32 and chatforge fp32/bf16/int8/int4 on the same prompts."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from chatforge.bench.decode import BenchSetting
    from chatforge.bench.report import (
        DEFAULT_SETTINGS,
        machine,
        markdown_table,
        print_table,
        run_rounds,
        run_setting,
        write_png,
    )
    from chatforge.errors import ChatforgeError
    from chatforge.models.registry import ALIASES, package_file

    if json_file is not None and not json_file.parent.exists():
        raise ChatforgeError(f"cannot write {json_file}: {json_file.parent} does not exist")
    settings = list(DEFAULT_SETTINGS)
    if only:
        wanted = {" ".join(o.split()) for o in only}
        settings = [s for s in settings if _name(s) in wanted]
        if not settings:
            names = ", ".join(_name(s) for s in DEFAULT_SETTINGS)
            raise ChatforgeError(f"--only matched no setting; choose from: {names}")
    if threads is not None:
        settings = [BenchSetting(s.engine, s.dtype, s.quantize, threads) for s in settings]
    new_tokens, batch_tokens, batches = (32, 16, (1, 8)) if quick else (128, 64, (1, 8, 32))
    if batch:
        batches = tuple(sorted(set(batch)))
    alias = ALIASES.get(model)
    gguf = str(package_file(alias)) if alias and package_file(alias) else None
    err = Console(stderr=True)
    settings = [s for s in settings if s.engine != "llama.cpp" or gguf is not None]

    def run(s: BenchSetting) -> list[dict]:
        err.print(f"[dim]measuring {_name(s)} ...[/]")
        return run_setting(s, model, new_tokens, batch_tokens, batches, gguf)

    def skipped(s: BenchSetting, e: Exception) -> None:
        err.print(f"[yellow]skipped {_name(s)}: {e}[/]")

    results = run_rounds(settings, rounds, run, skipped)
    quality_rows = None
    if quality:
        from chatforge.bench.quality import quality_check
        from chatforge.models import load_model

        err.print("[dim]quality check (perplexity on chitchat) ...[/]")
        quality_rows = quality_check(
            load_model(model, fast=False), conversations=8 if quick else 40
        )
    print_table(results, quality_rows)
    report = {
        "machine": machine(),
        "model": model,
        "results": results,
        "quality": quality_rows,
        "markdown": markdown_table(results),
    }
    if json_file is not None:
        json_file.write_text(json.dumps(report, indent=2))
        write_png(results, png or json_file.with_suffix(".png"))
    elif png is not None:
        write_png(results, png)


def _name(s) -> str:
    if s.engine == "transformers":
        return f"transformers {s.dtype}"
    if s.engine == "llama.cpp":
        return "llama.cpp"
    return f"chatforge {s.dtype}" + ("" if s.quantize == "none" else f" {s.quantize}")
