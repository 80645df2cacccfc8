"""``chatforge compare``: models x generation settings over a file of prompts, side by side."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from chatforge.cli.options import (
    ApiKeyEnvOpt,
    ApiKeyOpt,
    DeviceOpt,
    DtypeOpt,
    MaxConcurrencyOpt,
    PromptFormatOpt,
    QuantizeOpt,
    SystemOpt,
    ThreadsOpt,
    check_device,
    check_format,
    check_threads,
)


def compare_command(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="A model to compare (repeat for several): smollm2, a named model, a model "
            "directory, a .gguf file, or a LoRA adapter directory. Models on one base share "
            "it, loaded once; adapters are applied per request. A named model starts from "
            "its own system prompt and settings; --grid and --set override them. "
            "\\[default: smollm2]",
            show_default=False,
        ),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            "-g",
            help="NAME=V1,V2,...: a setting to vary (repeat for several; the columns are every "
            "combination). NAME is a generation setting (temperature, top_p, top_k, min_p, "
            "repetition_penalty, max_new_tokens, seed, stop, ...) or preset; '\\,' is a comma "
            "inside a value.",
            show_default=False,
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="NAME=VALUE: a generation setting for every cell (repeatable); 'off' turns "
            "one off.",
            show_default=False,
        ),
    ] = None,
    prompts: Annotated[
        Path,
        typer.Option(
            "--prompts",
            "-p",
            help="Prompts: .txt (one per line), .jsonl or .csv.",
            show_default=False,
        ),
    ] = ...,  # type: ignore[assignment]
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="The rows (.jsonl): one per prompt, model, setting and sample; rerunning "
            "runs only the cells not there yet (new models, new grid values).",
            show_default=False,
        ),
    ] = ...,  # type: ignore[assignment]
    samples: Annotated[int, typer.Option("--samples", "-n", help="Samples per cell.")] = 1,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Sample j of every cell uses SEED+j, so settings are compared on the same "
            "draws and a rerun reproduces the grid; --set seed=off draws fresh ones. "
            "\\[default: 0]",
            show_default=False,
        ),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template", "-T", help="Prompt template over record fields, e.g. 'Q: {question}'."
        ),
    ] = None,
    template_file: Annotated[
        str | None, typer.Option("--template-file", help="Read the template from this file.")
    ] = None,
    system: SystemOpt = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Where to write the HTML report. \\[default: the output with .html]",
            show_default=False,
        ),
    ] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Write no HTML report.")] = False,
    show_table: Annotated[
        bool | None,
        typer.Option(
            "--table/--no-table",
            help="Print the grid as a table on stdout. \\[default: when stdout is a terminal]",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", "-b", help="Sequences decoded together, per base model."),
    ] = 16,
    force_resume: Annotated[
        bool,
        typer.Option(
            "--force-resume",
            help="Add to an --output whose rows were made with another template, system "
            "prompt, format or endpoint.",
        ),
    ] = False,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Stop at the first bad record.")
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")
    ] = True,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    prompt_format: PromptFormatOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    api_base: Annotated[
        str | None,
        typer.Option(
            "--api-base",
            help="Compare models of an OpenAI-compatible endpoint at this URL (-m names them "
            "there).",
        ),
    ] = None,
    api_key: ApiKeyOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    max_concurrency: MaxConcurrencyOpt = None,
) -> None:
    """Run every prompt through every model x setting of a grid; write the rows, an HTML
    report beside them, and a table when stdout is a terminal."""
    from chatforge.batch.compare import DEFAULT_SEED, compare_grid, expand_grid, parse_params
    from chatforge.batch.compare_report import grid_view, table
    from chatforge.batch.remote import DEFAULT_CONCURRENCY
    from chatforge.batch.template import PromptTemplate
    from chatforge.cli.generate import print_summary
    from chatforge.errors import ChatforgeError, ParamError

    # Everything the user typed is checked before any model loads.
    if samples < 1:
        raise ParamError("samples", f"must be >= 1 (got {samples})")
    if batch_size < 1:
        raise ParamError("batch_size", f"must be >= 1 (got {batch_size})")
    if report is not None and no_report:
        raise ChatforgeError("give --report PATH or --no-report, not both")
    check_threads(threads)
    check_format(prompt_format)
    columns = expand_grid(grid)  # bad keys and values: one line naming --grid, now
    fixed = parse_params(set_)
    if seed is not None and ("seed" in fixed or any("seed" in c.values for c in columns)):
        where = "--set" if "seed" in fixed else "--grid"
        raise ParamError("seed", f"and {where} seed= both set the seed; give one")
    tmpl = PromptTemplate.from_options(template, template_file)
    key = source = None
    if api_base:
        local_only = {
            "--dtype": dtype != "auto",
            "--quantize": quantize is not None,
            "--threads": threads is not None,
            "--device": device != "auto",
            "--format": prompt_format is not None,
        }
        given = next((flag for flag, on in local_only.items() if on), None)
        if given:
            raise ChatforgeError(f"{given} applies to local models, not to --api-base")
        if max_concurrency is not None and max_concurrency < 1:
            raise ParamError("max_concurrency", f"must be >= 1 (got {max_concurrency})")
        from chatforge.openai_api import resolve_api_key

        key, source = resolve_api_key(api_key, api_key_env)
    else:
        device = check_device(device)  # a GPU the machine lacks: one line, before loading
        if max_concurrency is not None:
            raise ChatforgeError("--max-concurrency applies to --api-base")
        if api_key or api_key_env:
            raise ChatforgeError("--api-key and --api-key-env apply to --api-base")
    err = Console(stderr=True)
    summary = compare_grid(
        list(model or ["smollm2"]),
        str(prompts),
        output,
        grid=grid,
        params=set_,
        samples=samples,
        seed=DEFAULT_SEED if seed is None else seed,
        template=tmpl,
        system=system,
        batch_size=batch_size,
        fail_fast=fail_fast,
        progress=progress,
        dtype=dtype,
        quantize=quantize or "auto",
        threads=threads,
        prompt_format=prompt_format,
        device=device,
        force_resume=force_resume,
        api_base=api_base,
        api_key=key,
        key_source=source,
        max_concurrency=max_concurrency or DEFAULT_CONCURRENCY,
        report=False if no_report else (report or True),
    )
    if show_table is None:
        show_table = sys.stdout.isatty()
    if show_table and summary.rows:
        Console().print(table(grid_view(summary.rows, summary.columns)))
    if summary.report is not None:
        err.print(f"report: {summary.report}", highlight=False, soft_wrap=True)
    print_summary(summary, output, err, "nothing to do (no model was loaded)")
