"""``chatforge chat``: interactive chat, or chat over a file of prompts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from chatforge.cli.options import (
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
from chatforge.errors import ChatforgeError

HELP = """\
Commands:
  /help              this help
  /reset             start a new conversation (keeps the system prompt)
  /system TEXT       set the system prompt (empty: remove it)
  /set PARAM VALUE   change a generation parameter, e.g. /set temperature 0.2
  /params            show the generation parameters
  /save FILE         save the conversation (.jsonl or text)
  /history           show the conversation
  /quit              leave (Ctrl-D works too)
Multi-line input: end a line with \\ to continue it, or wrap a block in \"\"\".
Esc then Enter also inserts a newline. Ctrl-C stops a reply."""


def chat_command(
    model: ModelOpt = "smollm2",
    system: SystemOpt = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
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
    prompt_file: Annotated[
        str | None,
        typer.Option("--prompt-file", "-f", help="Each non-empty line is a user turn; - = stdin."),
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
    api_key_env: Annotated[
        str | None,
        typer.Option(
            "--api-key-env",
            help="Variable holding the endpoint's key (default: OPENAI_API_KEY if set).",
        ),
    ] = None,
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
) -> None:
    """Chat with a model: interactively, or over prompts from a file or stdin."""
    from chatforge.chat import ChatSession
    from chatforge.conversation import BudgetConfig
    from chatforge.models import load_model, parse_dtype
    from chatforge.models.loading import parse_quantize
    from chatforge.transcript import TranscriptWriter

    # Everything the user typed is checked before the (slow) model load.
    config = GenerationFlags.from_params(locals()).config(default_preset="balanced")
    parse_dtype(dtype)
    quantize = parse_quantize(quantize or "auto")
    budget = BudgetConfig(max_history_share=max_history_share)
    check_threads(threads)
    prompts: Iterator[str] | None = None
    if prompt_file is not None:
        prompts = _read_prompts(prompt_file)
    elif not sys.stdin.isatty():
        prompts = _read_prompts("-")
    writer = TranscriptWriter(output_file) if output_file else None

    err = Console(stderr=True)
    interactive = prompts is None
    log, resumed = _open_log(no_log, continue_, cid)
    if api_base:
        session = _remote_session(api_base, api_key_env, model, config, system)
        if interactive:
            err.print(f"[bold]{model}[/] at {api_base}. Type /help for commands.", highlight=False)
    else:
        with err.status(f"Loading {model} ...", spinner="dots") if interactive else _nullctx():
            loaded = load_model(model, dtype=dtype, quantize=quantize)
        use_threads(loaded, threads)  # before the session makes the model's engine
        session = ChatSession(loaded, config, system=system, budget=budget)
        if interactive:
            info = loaded.info
            err.print(
                f"[bold]{info.name}[/] ({info.n_params / 1e6:.0f}M params, context "
                f"{info.context_length}, {info.prompt_format}, {info.dtype}"
                f"{'' if info.quantize == 'none' else ' ' + info.quantize}, {info.engine} engine) "
                "loaded in "
                f"{info.load_seconds:.1f}s. Type /help for commands.",
                highlight=False,
            )
    if log is not None:
        session = _logged(session, log, model, api_base, resumed, system, err)
    if writer and system:
        writer.message("system", system)
    try:
        if interactive:
            _interactive(session, writer, err)
        else:
            assert prompts is not None
            _batch(session, prompts, writer, err, independent)
    finally:
        if writer:
            writer.close()
        if log is not None:
            log.close()


def _open_log(no_log: bool, continue_: bool, cid: int | None):
    """The conversation log (None with --no-log) and the conversation to resume."""
    from chatforge.store import ConversationLog

    if no_log:
        if continue_ or cid is not None:
            raise ChatforgeError("--continue and --cid need the conversation log; drop --no-log")
        return None, None
    log = ConversationLog()
    if cid is not None:
        return log, log.get(cid)
    if continue_:
        conv = log.latest()
        if conv is None:
            raise ChatforgeError("there is no logged conversation to continue")
        return log, conv
    return log, None


def _remote_session(api_base: str, api_key_env: str | None, model: str, config, system):
    import os

    from chatforge.remote import RemoteSession

    key = os.environ.get(api_key_env or "OPENAI_API_KEY")
    if not key and api_key_env:  # named explicitly, so it must be set
        raise ChatforgeError(f"the environment variable {api_key_env} is not set")
    return RemoteSession(api_base, model, api_key=key, config=config, system=system)


def _logged(session, log, model: str, api_base, resumed, system, err: Console):
    from chatforge.store import LoggedSession

    name = model if api_base else session.loaded.info.name
    logged = LoggedSession(
        session, log, name, backend="remote" if api_base else "local", api_base=api_base
    )
    if resumed is not None:
        logged.resume(resumed)
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


def _read_prompts(source: str) -> Iterator[str]:
    """Non-empty lines of a file (``-``: stdin); the file is checked up front."""
    if source == "-":
        stream = sys.stdin
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            raise ChatforgeError(f"prompt file {source} {what}")
        try:
            stream = open(path, encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise ChatforgeError(f"cannot read prompt file {source}: {e.strerror}") from e

    def lines() -> Iterator[str]:
        try:
            for line in stream:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
        except UnicodeDecodeError as e:
            raise ChatforgeError(f"prompt file {source} is not UTF-8 text ({e.reason})") from e

    return lines()


def _reply_extra(session) -> dict:
    reply = session.last
    return {
        "model": getattr(session, "model_name", None) or session.loaded.info.name,
        "params": reply.config.to_dict(),
        "prompt_tokens": reply.prompt_tokens,
        "cached_tokens": getattr(reply, "cached_tokens", 0),
        "completion_tokens": reply.completion_tokens,
        "finish_reason": reply.finish_reason,
        "seconds": round(reply.seconds, 3),
        "dropped_messages": len(reply.dropped),
    }


def _say(session, text: str, writer, err: Console, out=None) -> bool:
    """Stream one reply to stdout; return False when it was interrupted with Ctrl-C."""
    out = out or sys.stdout
    if writer:
        writer.message("user", text)
    gen = session.stream(text)
    interrupted = False
    try:
        for piece in gen:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        gen.close()  # records the partial reply as "interrupted"
        interrupted = True
    finally:
        out.write("\n")
        out.flush()
    reply = session.last
    if reply is not None:
        if reply.dropped:
            err.print(
                f"[dim](left out the {len(reply.dropped)} oldest messages to fit the context)[/]"
            )
        if interrupted:
            err.print("[dim](reply stopped)[/]")
        if writer:
            writer.message("assistant", reply.text, **_reply_extra(session))
    return not interrupted


def _batch(session, prompts: Iterator[str], writer, err: Console, independent: bool) -> None:
    for line in prompts:
        if line.startswith("/") and _command(session, line, writer, err):
            continue
        if independent:
            session.reset()
        try:
            _say(session, line, writer, err)
        except ChatforgeError:
            raise
        except ValueError as e:  # e.g. a prompt too long for the context
            raise ChatforgeError(str(e)) from e


def _interactive(session, writer, err: Console) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    from chatforge.paths import data_dir
    from chatforge.store.log import LogError

    try:
        data_dir().mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(data_dir() / "chat_history"))
    except OSError:
        history = InMemoryHistory()
    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event) -> None:  # Esc/Alt+Enter inserts a newline
        event.current_buffer.insert_text("\n")

    prompt = PromptSession(history=history, key_bindings=keys)
    while True:
        try:
            text = _read_input(prompt)
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line
        except EOFError:
            err.print("[dim]bye[/]")
            return
        if not text.strip():
            continue
        if text.startswith("/"):
            if _command(session, text, writer, err, interactive=True):
                continue
        try:
            _say(session, text, writer, err)
        except LogError:
            # The log failed (disk full, damaged file): stop rather than chat on
            # unlogged while the user believes every turn is kept. The message says
            # how to go on (--no-log, or --continue once there is room).
            raise
        except ChatforgeError as e:
            err.print(f"[red]error:[/] {e}", highlight=False)
        except ValueError as e:
            err.print(f"[red]error:[/] {e}", highlight=False)


def _read_input(prompt) -> str:
    """One user message: ``\\`` continues a line, a \"\"\" block spans lines."""
    text = prompt.prompt(">>> ")
    if text.strip() == '"""':
        lines = []
        while True:
            line = prompt.prompt("... ")
            if line.strip() == '"""':
                return "\n".join(lines)
            lines.append(line)
    while text.endswith("\\"):
        text = text[:-1] + "\n" + prompt.prompt("... ")
    return text


class _Quit(Exception):
    pass


def _command(session, line: str, writer, err: Console, interactive: bool = False) -> bool:
    """Run a slash command; return True when ``line`` was one (False: send it as text)."""
    name, _, arg = line[1:].partition(" ")
    name = name.lower()
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        raise typer.Exit(0)
    if name in ("help", "?"):
        err.print(HELP, highlight=False, markup=False)
    elif name == "reset":
        session.reset()
        err.print("[dim](new conversation)[/]")
        if writer:
            writer.note("new conversation")
    elif name == "system":
        session.system = arg or None
        err.print(f"[dim](system prompt {'set' if arg else 'removed'})[/]")
        if writer and arg:
            writer.message("system", arg)
    elif name == "set":
        pname, _, value = arg.partition(" ")
        try:
            session.config = session.config.set_param(pname, value.strip())
        except ValueError as e:
            _fail(err, str(e), interactive)
            return True
        err.print(f"[dim]({pname} = {value.strip()})[/]", highlight=False)
    elif name == "params":
        for k, v in session.config.to_dict().items():
            err.print(f"  {k} = {v}", highlight=False, markup=False)
    elif name == "save":
        if not arg:
            _fail(err, "/save needs a file name, e.g. /save chat.jsonl", interactive)
            return True
        _save(session, arg, err, interactive)
    elif name == "history":
        conv = session.conversation
        if conv.system:
            err.print(f"[dim]system:[/] {conv.system}", highlight=False)
        for m in conv.messages:
            err.print(f"[bold]{m.role}:[/] {m.content}", highlight=False)
    else:
        if not interactive:
            return False  # a prompt line that happens to start with "/"
        _fail(err, f"unknown command /{name}; type /help", interactive)
    return True


def _fail(err: Console, message: str, interactive: bool) -> None:
    if interactive:
        err.print(f"[red]error:[/] {message}", highlight=False)
    else:
        raise ChatforgeError(message)


def _save(session, path: str, err: Console, interactive: bool) -> None:
    from chatforge.transcript import TranscriptWriter

    target = Path(path).expanduser()
    tmp = target.with_name(target.name + ".tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        w = TranscriptWriter(tmp, jsonl=target.suffix.lower() == ".jsonl")
        for m in session.conversation.as_messages():
            w.message(m.role, m.content)
        w.close()
        tmp.replace(target)  # never leaves a half-written file under the user's name
    except (ChatforgeError, OSError) as e:
        _fail(err, f"could not save: {e}", interactive)
        return
    err.print(f"[dim](saved {len(session.conversation.messages)} messages to {target})[/]")
