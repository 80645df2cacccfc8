"""``chatforge logs``: list, show, search, remove and export the conversation log
(as training data, or as preference pairs from the judgements given in chat)."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from rich.console import Console

    from chatforge.store import ConversationLog, LoggedConversation, LoggedMessage

app = typer.Typer(
    help="The conversation log (every chat, in SQLite in the data dir).", no_args_is_help=True
)

MATCH_STYLE = "bold black on yellow"
SNIPPET_CONTEXT = 40  # characters either side of a match
MATCHES_SHOWN = 3  # per conversation


def _open() -> ConversationLog:
    from chatforge.store import ConversationLog

    return ConversationLog()


def _console() -> Console:
    """Where tables go: stdout (rich decides whether it is a terminal)."""
    from rich.console import Console

    return Console(highlight=False)


def _remove(path: Path) -> None:
    """Delete a partial export, quietly: the error being reported matters more."""
    with contextlib.suppress(OSError):
        path.unlink()


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _where(c: LoggedConversation) -> str:
    """The model, and the endpoint of a remote chat."""
    where = c.model or "?"
    if c.backend == "remote":
        where += f" @ {c.api_base}"
    return where


# ------------------------------------------------------------------ list


_HEADERS = ("id", "when", "model", "turns", "judged", "first message")
_NUMERIC = {0, 3, 4}  # right-aligned columns


_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """One line with no control characters (a logged reply may hold escape codes)."""
    return _CONTROL.sub(" ", text)


def _rows(convs: list[LoggedConversation]) -> list[tuple[str, ...]]:
    return [
        (
            str(c.id),
            _when(c.updated),
            _printable(_where(c)),
            str(c.n_turns),
            str(c.n_judgements or ""),  # blank: nothing judged
            _printable(c.preview),
        )
        for c in convs
    ]


def _plain_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Aligned columns (numbers right-aligned), the last one unpadded: for pipes."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)]

    def line(r: tuple[str, ...]) -> str:
        cells = [r[i].rjust(w) if i in _NUMERIC else r[i].ljust(w) for i, w in enumerate(widths)]
        return "  ".join([*cells, r[-1]]).rstrip()

    return "\n".join(line(r) for r in [headers, *rows])


def _rich_table(rows: list[tuple[str, ...]], width: int):
    """The same as a rich table ``width`` wide, one line per conversation (the model
    and first message are cut to fit); cells are Text, so `[brackets]` print as typed."""
    from rich.table import Table
    from rich.text import Text

    natural = [max(len(r[i]) for r in [_HEADERS, *rows]) for i in range(len(_HEADERS))]
    # Each column has a space either side, and a rule between columns.
    fixed = natural[0] + natural[1] + natural[3] + natural[4]
    free = width - fixed - 2 * len(_HEADERS) - (len(_HEADERS) - 1)
    model = min(natural[2], max(10, free // 3))
    rest = free - model
    table = Table(show_edge=False, header_style="bold")
    table.add_column("id", justify="right", no_wrap=True, width=natural[0])
    table.add_column("when", no_wrap=True, width=natural[1])
    table.add_column("model", no_wrap=True, overflow="ellipsis", width=model)
    table.add_column("turns", justify="right", no_wrap=True, width=natural[3])
    table.add_column("judged", justify="right", no_wrap=True, width=natural[4])
    table.add_column(
        "first message", no_wrap=True, overflow="ellipsis", width=max(13, min(natural[5], rest))
    )
    for r in rows:
        table.add_row(*(Text(cell) for cell in r))
    return table


def _table(convs: list[LoggedConversation]) -> None:
    if not convs:
        typer.echo("(no conversations)", err=True)
        return
    console = _console()
    if console.is_terminal:
        console.print(_rich_table(_rows(convs), console.width))
    else:
        typer.echo(_plain_table(_HEADERS, _rows(convs)))


@app.command("list")
def list_command(
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many (newest first).")] = 20,
) -> None:
    """List conversations, most recent first: id, when, model, turns, judgements of
    its replies (good, bad, edit, pick), first message."""
    if limit < 1:
        raise ChatforgeError("--limit must be >= 1")
    _table(_open().list(limit))


# ------------------------------------------------------------------ show


def _reply_stats(m: LoggedMessage) -> str:
    """A reply's model, finish reason, tokens, time and main settings."""
    bits = [m.model or "?", m.finish_reason or "finish reason not recorded"]
    if m.completion_tokens is not None:
        bits.append(f"{m.prompt_tokens} prompt + {m.completion_tokens} reply tokens")
    if m.seconds:
        bits.append(f"{m.seconds:.2f}s")
    if m.params:
        shown = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
        bits.append(", ".join(f"{k}={m.params[k]}" for k in shown if k in m.params))
    return f"  [{'; '.join(bits)}]"


def _indent(text: str, by: str) -> str:
    return "\n".join(by + line for line in text.split("\n"))


def _judgement_lines(m: LoggedMessage, main_id: int | None) -> list[str]:
    """How a reply was judged, one line each (an edit with its text below it)."""
    lines = []
    for j in m.judgements:
        if j.kind == "good":
            lines.append("👍 good")
        elif j.kind == "bad":
            lines.append("👎 bad")
        elif j.kind == "pick":
            other = "the reply above" if j.other_id == main_id else f"alternative #{j.other_id}"
            lines.append(f"✔ picked over {other}")
        elif j.kind == "edit":
            lines.append("✏ edited to:\n" + _indent(j.text or "", "  "))
    return lines


def _show_reply(m: LoggedMessage, main_id: int | None, by: str) -> None:
    """A reply's stats and judgements, indented by ``by``."""
    typer.echo(by + _reply_stats(m).lstrip())
    for line in _judgement_lines(m, main_id):
        typer.echo(_indent(line, by))


@app.command("show")
def show_command(cid: Annotated[int, typer.Argument(help="Conversation id.")]) -> None:
    """Show one conversation with each reply's model, finish reason, settings, tokens
    and timings, where the system prompt was changed, the judgements given (good,
    bad, edits with their text, picks), and the alternative replies (a /retry's
    earlier ones, the page's compare columns) under the reply they stand beside."""
    conv = _open().get(cid)
    typer.echo(f"conversation {conv.id}  {_when(conv.created)}  {_where(conv)}")
    if conv.initial_system:
        typer.echo(f"\nsystem: {conv.initial_system}")
    for m in conv.messages:
        if m.role == "system":  # changed part way: the replies below were written under it
            typer.echo(f"\nsystem (changed): {m.content}" if m.content else "\nsystem (removed)")
            continue
        typer.echo(f"\n{m.role}: {m.content}")
        if m.role == "assistant":
            _show_reply(m, m.id, "  ")
            for alt in m.alternatives:
                typer.echo(f"\n  alternative #{alt.id} (not in the history):")
                typer.echo(_indent(alt.content, "    "))
                _show_reply(alt, m.id, "    ")


# ------------------------------------------------------------------ search


def _spans(content: str, text: str) -> list[tuple[int, int]]:
    """Where ``text`` occurs in ``content``, ignoring case."""
    return [m.span() for m in re.finditer(re.escape(text), content, re.IGNORECASE)]


def _snippet(content: str, span: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    """The text around one match on one line, and where the match is in it."""
    start, end = span
    lo, hi = max(0, start - SNIPPET_CONTEXT), min(len(content), end + SNIPPET_CONTEXT)
    before = ("..." if lo > 0 else "") + _printable(content[lo:start])
    after = _printable(content[end:hi]) + ("..." if hi < len(content) else "")
    return before + _printable(content[start:end]) + after, (len(before), len(before) + end - start)


def _match_lines(hits: list[LoggedMessage], text: str) -> list[tuple[str, tuple[int, int]]]:
    """``role: snippet`` per match (at most MATCHES_SHOWN), with the match's place."""
    out: list[tuple[str, tuple[int, int]]] = []
    total = 0
    for m in hits:
        for span in _spans(m.content, text) or [(0, 0)]:
            total += 1
            if len(out) < MATCHES_SHOWN:
                snip, (a, b) = _snippet(m.content, span)
                head = f"    {m.role}: "
                out.append((head + snip, (len(head) + a, len(head) + b)))
    if total > len(out):
        out.append((f"    (+{total - len(out)} more)", (0, 0)))
    return out


def _print_matches(found: list[tuple[LoggedConversation, list[LoggedMessage]]], text: str) -> None:
    """Each conversation's id, time and model, then its matches: highlighted on a
    terminal, plain text (no escape codes) through a pipe."""
    console = _console()
    for conv, hits in found:
        header = f"{conv.id}  {_when(conv.updated)}  {_where(conv)}"
        lines = _match_lines(hits, text)
        if console.is_terminal:
            from rich.text import Text

            console.print(Text(header, style="bold"))
            for line, (a, b) in lines:
                shown = Text(line)
                shown.stylize(MATCH_STYLE, a, b)
                console.print(shown, overflow="ellipsis", no_wrap=True)
        else:
            typer.echo(header)
            for line, _ in lines:
                typer.echo(line)


@app.command("search")
def search_command(
    text: Annotated[str, typer.Argument(help="Text to look for (any case).")],
    limit: Annotated[int, typer.Option("--limit", "-n", help="Most conversations.")] = 50,
) -> None:
    """Conversations with a message containing TEXT, with the text around each match."""
    if limit < 1:
        raise ChatforgeError("--limit must be >= 1")
    if not text.strip():
        raise ChatforgeError("give some text to search for")
    found = _open().search_messages(text, limit)
    if not found:
        typer.echo("(no conversations)", err=True)
        return
    _print_matches(found, text)


# ------------------------------------------------------------------ rm


def _confirm(question: str) -> bool:
    """Ask on the terminal; no answer (end of input) is no."""
    import click

    try:
        return typer.confirm(question, default=False)
    except (click.exceptions.Abort, typer.Abort):  # typer's own Abort in newer versions
        return False


@app.command("rm")
def rm_command(
    ids: Annotated[list[int] | None, typer.Argument(help="Conversation ids.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every conversation.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before --all.")] = False,
) -> None:
    """Remove conversations: all the ids given or (when one is unknown) none."""
    if all_ == bool(ids):
        raise ChatforgeError("give conversation ids to remove, or --all (not both)")
    log = _open()
    if ids:
        n = log.remove(ids)
    else:
        if not yes and not _confirm(f"Remove all {log.count()} conversations from {log.path}?"):
            raise ChatforgeError("not confirmed: nothing removed (--yes skips the question)")
        n = log.remove_all()
    typer.echo(f"removed {n} conversation{'s' if n != 1 else ''}", err=True)


# ------------------------------------------------------------------ export


def parse_since(value: str) -> float:
    """``--since``: an ISO date (local midnight) or date and time (local unless it
    has an offset), as unix time."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ChatforgeError(
            f"--since {value!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        ) from None
    return when.timestamp()  # naive: local time


@app.command("export")
def export_command(
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="training: {'messages': [...]} JSONL; preference: TRL's "
            "{'prompt', 'chosen', 'rejected'} JSONL from your judgements.",
        ),
    ] = "training",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
    include_interrupted: Annotated[
        bool, typer.Option(help="Keep replies interrupted with Ctrl-C (and their questions).")
    ] = False,
    include_truncated: Annotated[
        bool,
        typer.Option(help="Keep replies cut at the token limit (and their questions)."),
    ] = False,
    model: Annotated[
        str | None, typer.Option("--model", help="Only conversations with a reply from it.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only conversations started on or after this date (YYYY-MM-DD[THH:MM])."),
    ] = None,
    cid: Annotated[
        list[int] | None, typer.Option("--cid", help="Only this conversation (repeatable).")
    ] = None,
) -> None:
    """Export the log as training data that `chatforge train` reads unchanged, or
    (--format preference) as preference pairs for DPO in TRL's conversational format.

    training: a reply that was interrupted or cut at the token limit is left out
    with the question it answers (the --include flags keep them); failed and empty
    replies always are. A reply you edited is written as edited; /retry's earlier
    replies are not written. A conversation whose system prompt changed part way
    becomes one line per system prompt, each with the turns answered under it.

    preference: one line per pair from /pick (and the page's compare pick), /edit
    (your text beats the reply) and /good against /bad on replies to the same prompt.
    """
    if format not in ("training", "preference"):
        raise ChatforgeError(f"unknown export format {format!r}; use training or preference")
    filters: dict[str, Any] = dict(
        cids=cid or None, model=model, since=parse_since(since) if since is not None else None
    )
    if format == "preference":
        flag = "--include-interrupted" if include_interrupted else "--include-truncated"
        if include_interrupted or include_truncated:
            raise ChatforgeError(f"{flag} is for --format training; a judged reply is always used")
        counts = _export(_open(), output, "export_preference", filters)
        typer.echo(_preference_note(counts), err=True)
        return
    skipped: dict[str, int] = {}
    edited: list[int] = []
    filters.update(
        include_interrupted=include_interrupted,
        include_truncated=include_truncated,
        skipped=skipped,
        edited=edited,
    )
    n = _export(_open(), output, "export_training", filters)
    note = f"; {_plural(len(edited), 'reply', 'replies')} as you edited them" if edited else ""
    typer.echo(
        f"exported {n} conversation{'s' if n != 1 else ''}{note}{_skipped_note(skipped)}",
        err=True,
    )


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _preference_note(counts: Any) -> str:
    """Pairs written by source, and the judgements that gave none, by reason."""
    from chatforge.store.preference import PAIR_SOURCES, describe_left_out

    note = f"exported {_plural(counts.pairs, 'preference pair', 'preference pairs')}"
    if counts.pairs:
        note += (
            " ("
            + ", ".join(f"{counts.written[s]} {s}" for s in PAIR_SOURCES if counts.written[s])
            + ")"
        )
    if counts.left_out:
        bits = [describe_left_out(reason, n) for reason, n in sorted(counts.left_out.items())]
        note += "; left out " + ", ".join(bits)
    if not counts.pairs and not counts.left_out:
        note += "; judge replies in chat with /good, /bad, /edit, /retry then /pick"
    return note


def _skipped_note(skipped: dict[str, int]) -> str:
    """What was left out and the flag that keeps it."""
    said = {
        "interrupted": "{n} interrupted {replies} (--include-interrupted keeps them)",
        "length": "{n} {replies} cut at the token limit (--include-truncated keeps them)",
    }
    bits = [
        said[r].format(n=n, replies="reply" if n == 1 else "replies")
        for r, n in sorted(skipped.items())
    ]
    return f"; left out {' and '.join(bits)}" if bits else ""


def _export(log: ConversationLog, output: Path | None, method: str, filters: dict) -> Any:
    """Run the log's export ``method`` into ``output`` (stdout when None), a file
    written whole or not at all; returns what the method does."""
    from chatforge.fsutil import atomic_file

    if output is None:
        return getattr(log, method)(sys.stdout, **filters)
    try:  # never a half-written file under the user's name, also if the log fails
        with atomic_file(output.expanduser(), "w") as f:
            return getattr(log, method)(f, **filters)
    except OSError as e:
        raise ChatforgeError(f"cannot write {output}: {e.strerror}") from e
