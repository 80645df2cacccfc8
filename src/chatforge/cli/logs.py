"""``chatforge logs``: list, show, search and export the conversation log."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from chatforge.errors import ChatforgeError

app = typer.Typer(
    help="The conversation log (every chat, in SQLite in the data dir).", no_args_is_help=True
)


def _open():
    from chatforge.store import ConversationLog

    return ConversationLog()


def _remove(path: Path) -> None:
    """Delete a partial export, quietly: the error being reported matters more."""
    with contextlib.suppress(OSError):
        path.unlink()


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _table(convs) -> None:
    if not convs:
        typer.echo("(no conversations)", err=True)
        return
    for c in convs:
        where = c.model or "?"
        if c.backend == "remote":
            where += f" @ {c.api_base}"
        typer.echo(f"{c.id:>5}  {_when(c.updated)}  {c.n_messages:>3} msgs  {where}  {c.preview}")


@app.command("list")
def list_command(
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many (newest first).")] = 20,
) -> None:
    """List conversations, most recent first."""
    if limit < 1:
        raise ChatforgeError("--limit must be >= 1")
    log = _open()
    _table(log.list(limit))


@app.command("show")
def show_command(cid: Annotated[int, typer.Argument(help="Conversation id.")]) -> None:
    """Show one conversation with each reply's model, settings, tokens and timings."""
    conv = _open().get(cid)
    where = conv.model or "?"
    if conv.backend == "remote":
        where += f" @ {conv.api_base}"
    typer.echo(f"conversation {conv.id}  {_when(conv.created)}  {where}")
    if conv.system:
        typer.echo(f"\nsystem: {conv.system}")
    for m in conv.messages:
        typer.echo(f"\n{m.role}: {m.content}")
        if m.role == "assistant":
            bits = [m.model or "?", f"{m.finish_reason}"]
            if m.completion_tokens is not None:
                bits.append(f"{m.prompt_tokens} prompt + {m.completion_tokens} reply tokens")
            if m.seconds:
                bits.append(f"{m.seconds:.2f}s")
            if m.params:
                shown = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
                bits.append(", ".join(f"{k}={m.params[k]}" for k in shown if k in m.params))
            typer.echo(f"  [{'; '.join(bits)}]")


@app.command("search")
def search_command(
    text: Annotated[str, typer.Argument(help="Text to look for (any case).")],
    limit: Annotated[int, typer.Option("--limit", "-n", help="Most results.")] = 50,
) -> None:
    """Conversations with a message containing TEXT."""
    if not text.strip():
        raise ChatforgeError("give some text to search for")
    _table(_open().search(text, limit))


@app.command("export")
def export_command(
    format: Annotated[
        str, typer.Option("--format", help="training: {'messages': [...]} JSONL.")
    ] = "training",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Export the log as training data that `chatforge train` reads unchanged."""
    if format != "training":
        raise ChatforgeError(f"unknown export format {format!r}; use training")
    log = _open()
    if output is None:
        n = log.export_training(sys.stdout)
    else:
        target = output.expanduser()
        tmp = target.with_name(target.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                n = log.export_training(f)
            tmp.replace(target)  # never a half-written file under the user's name
        except OSError as e:
            _remove(tmp)
            raise ChatforgeError(f"cannot write {output}: {e.strerror}") from e
        except ChatforgeError:  # the log failed part way: leave no partial export behind
            _remove(tmp)
            raise
    typer.echo(f"exported {n} conversations", err=True)
