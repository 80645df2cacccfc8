"""``chatforge generate``: run a model over a file of prompts (batched, resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from chatforge.cli.options import (
    DEFAULT_PRESET,
    DtypeOpt,
    FrequencyOpt,
    GenerationFlags,
    JsonSchemaOpt,
    LogitBiasOpt,
    MaxLenOpt,
    MaxNewOpt,
    MinPOpt,
    ModelOpt,
    NoRepeatOpt,
    PresenceOpt,
    PresetOpt,
    QuantizeOpt,
    RepPenOpt,
    SeedOpt,
    StopOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    check_threads,
    use_threads,
)


def generate_command(
    input: Annotated[
        str,
        typer.Argument(help="Prompts: .txt (one per line), .jsonl or .csv.", show_default=False),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Results (.jsonl or .csv); rerunning skips rows already there.",
            show_default=False,
        ),
    ],
    template: Annotated[
        str | None,
        typer.Option(
            "--template", "-T", help="Prompt template over record fields, e.g. 'Q: {question}'."
        ),
    ] = None,
    template_file: Annotated[
        str | None, typer.Option("--template-file", help="Read the template from this file.")
    ] = None,
    model: ModelOpt = "smollm2",
    system: SystemOpt = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    n: Annotated[int, typer.Option("--n", help="Samples per prompt.")] = 1,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Sequences decoded together.")
    ] = 16,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Stop at the first bad record.")
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")
    ] = True,
    preset: PresetOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepPenOpt = None,
    no_repeat_ngram_size: NoRepeatOpt = None,
    presence_penalty: PresenceOpt = None,
    frequency_penalty: FrequencyOpt = None,
    logit_bias: LogitBiasOpt = None,
    json_schema: JsonSchemaOpt = None,
    max_new_tokens: MaxNewOpt = None,
    max_length: MaxLenOpt = None,
    stop: StopOpt = None,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Generate a reply for every record of INPUT, one row each in --output."""
    from chatforge.batch import PromptTemplate, generate_batch
    from chatforge.batch.output import check_output
    from chatforge.batch.records import check_input
    from chatforge.errors import ChatforgeError
    from chatforge.models import load_model, parse_dtype
    from chatforge.models.loading import parse_quantize

    # Everything the user typed is checked before the (slow) model load.
    config = GenerationFlags.from_params(locals()).config(default_preset=DEFAULT_PRESET)
    if n < 1:
        raise ChatforgeError(f"--n must be >= 1 (got {n})")
    if batch_size < 1:
        raise ChatforgeError(f"--batch-size must be >= 1 (got {batch_size})")
    check_threads(threads)
    tmpl = PromptTemplate.from_options(template, template_file)
    check_input(input)
    check_output(output)
    parse_dtype(dtype)
    quantize = parse_quantize(quantize or "auto")

    err = Console(stderr=True)

    def load():  # called by generate_batch only if some row is still to do
        with err.status(f"Loading {model} ...", spinner="dots") if progress else _nullctx():
            loaded = load_model(model, dtype=dtype, quantize=quantize)
        use_threads(loaded, threads)  # before generate_batch makes the model's engine
        return loaded

    summary = generate_batch(
        load,
        input,
        output,
        template=tmpl,
        system=system,
        config=config,
        n=n,
        batch_size=batch_size,
        fail_fast=fail_fast,
        progress=progress,
    )
    if summary.torn_bytes:
        err.print(
            f"[dim]cut a torn last row ({summary.torn_bytes} bytes) from {output}[/]",
            highlight=False,
        )
    if summary.total and summary.skipped == summary.total:
        err.print(
            f"all {summary.total} records already have a row in {output}: nothing to do "
            "(the model was not loaded)",
            highlight=False,
            soft_wrap=True,
        )
        return
    for message in summary.error_messages:
        err.print(f"[yellow]error row:[/] {message}", highlight=False, soft_wrap=True)
    if summary.errors > len(summary.error_messages):
        err.print(f"[dim]... see the 'error' field in {output}[/]", highlight=False)
    err.print(str(summary), highlight=False, soft_wrap=True)


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
