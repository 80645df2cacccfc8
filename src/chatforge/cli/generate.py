"""``chatforge generate``: run a model over a file of prompts (batched, resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from chatforge.cli.options import (
    ApiKeyEnvOpt,
    ApiKeyOpt,
    DeviceOpt,
    DtypeOpt,
    FrequencyOpt,
    GenerationFlags,
    JsonSchemaOpt,
    KeepOpt,
    LogitBiasOpt,
    MaxConcurrencyOpt,
    MaxLenOpt,
    MaxNewOpt,
    MinPOpt,
    ModelOpt,
    NoRepeatOpt,
    PresenceOpt,
    PresetOpt,
    PromptFormatOpt,
    QuantizeOpt,
    RepPenOpt,
    SeedOpt,
    SlideOpt,
    StopOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    check_device,
    check_format,
    check_threads,
    named_model,
    recipe_settings,
    use_threads,
)

DEFAULT_BATCH_SIZE = 16


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
            help=(
                "Results (.jsonl, .csv, or .txt: each prompt and its continuation, the rows "
                "kept beside it in OUT.rows.jsonl); rerunning skips rows already there."
            ),
            show_default=False,
        ),
    ],
    force_resume: Annotated[
        bool,
        typer.Option(
            "--force-resume",
            help="Add to an --output whose rows were made with other settings "
            "(model, template, system prompt, --n, generation settings).",
        ),
    ] = False,
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
    device: DeviceOpt = "auto",
    prompt_format: PromptFormatOpt = None,
    n: Annotated[int, typer.Option("--n", help="Samples per prompt.")] = 1,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help=f"Sequences decoded together. \\[default: {DEFAULT_BATCH_SIZE}]",
            show_default=False,
        ),
    ] = None,
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
    slide: SlideOpt = None,
    keep: KeepOpt = None,
    threads: ThreadsOpt = None,
    api_base: Annotated[
        str | None,
        typer.Option(
            "--api-base",
            help="Send the prompts to an OpenAI-compatible endpoint at this URL "
            "(--model names the model there).",
        ),
    ] = None,
    api_key: ApiKeyOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    max_concurrency: MaxConcurrencyOpt = None,
) -> None:
    """Generate a reply for every record of INPUT, one row each in --output."""
    from chatforge.batch import PromptTemplate, generate_batch
    from chatforge.batch.output import check_output
    from chatforge.batch.records import check_input
    from chatforge.errors import ChatforgeError
    from chatforge.models import load_model, parse_dtype
    from chatforge.models.loading import parse_quantize
    from chatforge.models.recipes import load_recipe_model

    # Everything the user typed is checked before the (slow) model load.
    flags = GenerationFlags.from_params(locals())
    if n < 1:
        raise ChatforgeError(f"--n must be >= 1 (got {n})")
    if batch_size is not None and batch_size < 1:
        raise ChatforgeError(f"--batch-size must be >= 1 (got {batch_size})")
    check_threads(threads)
    check_format(prompt_format)
    tmpl = PromptTemplate.from_options(template, template_file)
    check_input(input)
    check_output(output)
    err = Console(stderr=True)
    if api_base:
        local_only = {
            "--batch-size": batch_size is not None,
            "--dtype": dtype != "auto",
            "--quantize": quantize is not None,
            "--threads": threads is not None,
            "--device": device != "auto",
            "--format": prompt_format is not None,
        }
        given = [flag for flag, on in local_only.items() if on]
        if given:
            raise ChatforgeError(
                f"{given[0]} applies to a local model, not to --api-base "
                "(--max-concurrency sets the requests in flight)"
            )
        from chatforge.batch.remote import DEFAULT_CONCURRENCY, generate_batch_remote
        from chatforge.openai_api import remote_config, resolve_api_key

        if max_concurrency is not None and max_concurrency < 1:
            raise ChatforgeError(f"--max-concurrency must be >= 1 (got {max_concurrency})")
        config = remote_config(flags.preset, **flags.given())  # as chat --api-base
        key, source = resolve_api_key(api_key, api_key_env)
        summary = generate_batch_remote(
            api_base,
            model,
            input,
            output,
            template=tmpl,
            system=system,
            config=config,
            n=n,
            max_concurrency=max_concurrency or DEFAULT_CONCURRENCY,
            fail_fast=fail_fast,
            progress=progress,
            api_key=key,
            key_source=source,
            force_resume=force_resume,
        )
        print_summary(summary, output, err, "nothing to do")
        return
    if max_concurrency is not None:
        raise ChatforgeError(
            "--max-concurrency applies to --api-base; a local model decodes --batch-size "
            "sequences together"
        )
    if api_key or api_key_env:
        raise ChatforgeError("--api-key and --api-key-env apply to --api-base")
    recipe = named_model(model)
    config, system, _ = recipe_settings(recipe, flags, system)
    parse_dtype(dtype)
    quantize = parse_quantize(quantize or "auto")
    device = check_device(device)  # a GPU the machine lacks: one line, before loading

    def load():  # called by generate_batch only if some row is still to do
        with err.status(f"Loading {model} ...", spinner="dots") if progress else _nullctx():
            if recipe is not None:
                loaded = load_recipe_model(
                    recipe, dtype=dtype, quantize=quantize, format=prompt_format, device=device
                )
            else:
                loaded = load_model(
                    model, dtype=dtype, quantize=quantize, format=prompt_format, device=device
                )
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
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
        fail_fast=fail_fast,
        progress=progress,
        force_resume=force_resume,
        model_name=recipe.name if recipe is not None else model,
        prompt_format=prompt_format,
    )
    print_summary(summary, output, err, "nothing to do (the model was not loaded)")


def print_summary(summary, output: Path, err: Console, idle: str) -> None:
    """The run's summary (its first errors, and errors by kind) on stderr; exit 1 when
    every record the run tried failed."""
    from chatforge.batch.remote import RERUN

    if summary.torn_bytes:
        err.print(
            f"[dim]cut a torn last row ({summary.torn_bytes} bytes) from {output}[/]",
            highlight=False,
        )
    if summary.total and summary.skipped == summary.total:
        err.print(
            f"all {summary.total} records already have a row in {output}: {idle}",
            highlight=False,
            soft_wrap=True,
        )
        return
    for message in summary.error_messages:
        label = "error" if message.endswith(RERUN) else "error row"
        err.print(f"[yellow]{label}:[/] {message}", highlight=False, soft_wrap=True)
    if summary.errors > len(summary.error_messages):
        err.print(f"[dim]... see the 'error' field in {output}[/]", highlight=False)
    if summary.errors:
        err.print(summary.errors_by_kind(), highlight=False, soft_wrap=True)
    if summary.context_notice():
        err.print(f"[yellow]note:[/] {summary.context_notice()}", highlight=False, soft_wrap=True)
    err.print(str(summary), highlight=False, soft_wrap=True)
    if summary.failed:
        err.print(
            f"[red]error:[/] no record succeeded: all {summary.errors} records this run "
            "tried failed",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
