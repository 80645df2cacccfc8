"""``chatforge chat``: interactive chat, or chat over a file of prompts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from chatforge.cli.options import (
    DEFAULT_MODEL,
    ApiKeyEnvOpt,
    ApiKeyOpt,
    DeviceOpt,
    DtypeOpt,
    FrequencyOpt,
    GenerationFlags,
    JsonSchemaOpt,
    KeepOpt,
    LogitBiasOpt,
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
    model_ref,
    named_model,
    recipe_settings,
    use_threads,
)
from chatforge.errors import ChatforgeError


def chat_command(
    name: Annotated[
        str | None,
        typer.Argument(
            help="The model to chat with: a named model (`chatforge models create`) or "
            "anything --model takes.",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    system: SystemOpt = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    device: DeviceOpt = "auto",
    prompt_format: PromptFormatOpt = None,
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
    prompt_file: Annotated[
        str | None,
        typer.Option(
            "--prompt-file",
            "-f",
            help="Each non-empty line is a user turn (only blank lines: one empty prompt, "
            "sampled from the start token); - = stdin.",
        ),
    ] = None,
    independent: Annotated[
        bool, typer.Option("--independent", help="Each prompt line is its own conversation.")
    ] = False,
    output_file: Annotated[
        Path | None,
        typer.Option("--output-file", "-o", help="Append the transcript here (.jsonl or text)."),
    ] = None,
    max_history_share: Annotated[
        float,
        typer.Option("--max-history-share", help="Share of the context history may take."),
    ] = 1.0,
    api_base: Annotated[
        str | None,
        typer.Option("--api-base", help="Chat with an OpenAI-compatible endpoint at this URL."),
    ] = None,
    api_key: ApiKeyOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    continue_: Annotated[
        bool, typer.Option("--continue", "-c", help="Continue the latest logged conversation.")
    ] = False,
    cid: Annotated[
        int | None, typer.Option("--cid", help="Continue the logged conversation with this id.")
    ] = None,
    no_log: Annotated[
        bool, typer.Option("--no-log", help="Do not write this chat to the conversation log.")
    ] = False,
    threads: ThreadsOpt = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="After each reply, show its stats: tokens, tok/s, time to first token.",
        ),
    ] = False,
    plain: Annotated[
        bool,
        typer.Option("--plain", help="Print replies as plain text, not rendered Markdown."),
    ] = False,
) -> None:
    """Chat with a model: interactively, or over prompts from a file or stdin."""
    from chatforge.conversation import BudgetConfig
    from chatforge.models import load_model, parse_dtype
    from chatforge.models.loading import parse_quantize
    from chatforge.models.recipes import load_recipe_model
    from chatforge.transcript import TranscriptWriter

    # Everything the user typed is checked before the (slow) model load, and before torch
    # is imported (chatforge.chat and the REPL import it: 3 s before a one-line error).
    flags = GenerationFlags.from_params(locals())
    model = model_ref(name, model)
    recipe = None if api_base else named_model(model)
    config, system, preset = recipe_settings(recipe, flags, system)
    if api_base:
        from chatforge.openai_api import remote_config, request_params

        config = remote_config(flags.preset, **flags.given())  # as generate --api-base
        request_params(config)  # a setting no request can carry fails now
    parse_dtype(dtype)
    quantize = parse_quantize(quantize or "auto")
    if not api_base:
        device = check_device(device)  # a GPU the machine lacks: one line, before loading
    budget = BudgetConfig(max_history_share=max_history_share)
    check_threads(threads)
    check_format(prompt_format)
    if api_base and device != "auto":
        raise ChatforgeError("--device applies to a local model, not to --api-base")
    if api_base and prompt_format:
        raise ChatforgeError("--format applies to a local model, not to --api-base")
    from chatforge.chat import ChatSession
    from chatforge.repl import ChatRepl, open_log, read_prompts, use_markdown

    prompts: Iterator[str] | None = None
    if prompt_file is not None:
        prompts = read_prompts(prompt_file)
    elif not sys.stdin.isatty():
        prompts = read_prompts("-")
    writer = TranscriptWriter(output_file) if output_file else None

    err = Console(stderr=True)
    interactive = prompts is None
    log, resumed = open_log(no_log, continue_, cid)
    if api_base:
        session = _remote_session(api_base, api_key, api_key_env, model, config, system)
        if interactive:
            err.print(f"[bold]{model}[/] at {api_base}. Type /help for commands.", highlight=False)
    else:
        with err.status(f"Loading {model} ...", spinner="dots") if interactive else _nullctx():
            if recipe is not None:
                loaded = load_recipe_model(
                    recipe, dtype=dtype, quantize=quantize, format=prompt_format, device=device
                )
            else:
                loaded = load_model(
                    model, dtype=dtype, quantize=quantize, format=prompt_format, device=device
                )
        use_threads(loaded, threads)  # before the session makes the model's engine
        session = ChatSession(loaded, config, system=system, budget=budget)
        if interactive:
            info = loaded.info
            err.print(
                f"[bold]{info.name}[/] ({info.n_params / 1e6:.0f}M params, context "
                f"{info.context_length}, {info.prompt_format}, {info.dtype}"
                f"{'' if info.quantize == 'none' else ' ' + info.quantize}, {info.engine} engine"
                f"{'' if info.device == 'cpu' else ' on ' + info.device}) "
                "loaded in "
                f"{info.load_seconds:.1f}s. Type /help for commands.",
                highlight=False,
            )
    if log is not None:
        session = _logged(session, log, model, api_base, resumed, system, err)
    if writer and system:
        writer.message("system", system)
    repl = ChatRepl(
        session,
        err,
        writer=writer,
        interactive=interactive,
        preset=preset,
        verbose=verbose,
        markdown=use_markdown(plain, sys.stdout),
    )
    try:
        if interactive:
            repl.run_interactive()
        else:
            assert prompts is not None
            repl.run_batch(prompts, independent)
    finally:
        if writer:
            writer.close()
        if log is not None:
            log.close()


def _remote_session(
    api_base: str, api_key: str | None, api_key_env: str | None, model: str, config, system
):
    from chatforge.openai_api import resolve_api_key
    from chatforge.remote import RemoteSession

    key, source = resolve_api_key(api_key, api_key_env)
    return RemoteSession(
        api_base, model, api_key=key, config=config, system=system, key_source=source
    )


def _logged(session, log, model: str, api_base, resumed, system, err: Console):
    from chatforge.repl import resumable_messages
    from chatforge.store import LoggedSession

    name = model if api_base else session.loaded.info.name
    logged = LoggedSession(
        session, log, name, backend="remote" if api_base else "local", api_base=api_base
    )
    if resumed is not None:
        logged.resume(resumed)
        logged.conversation.messages = resumable_messages(resumed)  # no partial replies
        if system:  # --system given now wins over the logged one
            logged.system = system
        err.print(
            f"[dim](continuing conversation {resumed.id}: {len(resumed.messages)} messages)[/]"
        )
    return logged


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
