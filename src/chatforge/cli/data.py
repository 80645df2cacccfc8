"""``chatforge data inspect``: rendered training examples, loss tokens highlighted, statistics."""

from __future__ import annotations

from typing import Annotated

import typer

from chatforge.errors import ChatforgeError

app = typer.Typer(help="Look at training data as the trainer sees it.", no_args_is_help=True)


@app.command("inspect")
def inspect_command(
    data: Annotated[list[str], typer.Argument(help="Data file(s), folder, or chitchat.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model whose format renders the data.")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Or a tokenizer directory (sep format).")
    ] = None,
    format: Annotated[str | None, typer.Option("--format", help="Prompt format override.")] = None,
    data_format: Annotated[
        str | None, typer.Option("--data-format", help="Data kind override.")
    ] = None,
    train_on: Annotated[str, typer.Option("--train-on", help="assistant, all or last.")] = (
        "assistant"
    ),
    context: Annotated[int | None, typer.Option("--context", help="Row length in tokens.")] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Examples to show.")] = 3,
    on_error: Annotated[str, typer.Option("--on-error", help="skip or fail.")] = "skip",
) -> None:
    """Show a few examples with loss-carrying tokens highlighted, then statistics."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from chatforge.conversation.formats import ensure_sep_token, get_format
    from chatforge.training.data import load_data
    from chatforge.training.examples import TRAIN_ON, build_examples

    if (model is None) == (tokenizer is None):
        raise ChatforgeError(
            "pass --model M or --tokenizer DIR (whose prompt format renders the data)"
        )
    if train_on not in TRAIN_ON:
        raise ChatforgeError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if count < 0:
        raise ChatforgeError("--count must be >= 0")
    if context is not None and context < 8:
        raise ChatforgeError("--context must be >= 8")
    bad: list[str] = []
    ds = load_data(data, data_format, on_error, bad.append)
    if model is not None:
        from chatforge.models import load_model

        lm = load_model(model, fast=False)  # only the tokenizer and format are used
        tok, fmt_name, limit = lm.tokenizer, format or lm.info.prompt_format, lm.context_length
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        fmt_name, limit = format or "sep", 256
    if fmt_name == "sep":
        ensure_sep_token(tok)
    fmt = get_format(fmt_name, tok)
    ctx = context or min(limit, 1024)
    examples, st = build_examples(fmt, ds, ctx, train_on)
    out = Console(highlight=False)
    for i, ex in enumerate(examples[:count]):
        out.rule(f"example {i + 1} ({len(ex)} tokens, {ex.n_loss} with loss)")
        # Runs of learned / context tokens; without colours (a pipe) learned runs get [[ ]].
        runs: list[tuple[bool, list[int]]] = []
        for tid, learn in zip(ex.ids, ex.mask, strict=True):
            if runs and runs[-1][0] == learn:
                runs[-1][1].append(tid)
            else:
                runs.append((learn, [tid]))
        if not out.is_terminal:  # plain text, no markup: [[ ]] around learned runs
            plain = "".join(
                f"[[{tok.decode(ids)}]]" if learn else tok.decode(ids) for learn, ids in runs
            )
            out.print(plain, markup=False, soft_wrap=True)
            continue
        parts = []
        for learn, ids in runs:
            piece = escape(tok.decode(ids))
            parts.append(f"[bold green on grey15]{piece}[/]" if learn else f"[dim]{piece}[/]")
        out.print("".join(parts))
    out.rule("statistics")
    table = Table(show_header=False)
    table.add_row("data kind / prompt format", f"{ds.kind} / {fmt_name}")
    table.add_row("items read", f"{st.sources:,}")
    table.add_row("malformed lines skipped", f"{len(bad):,}")
    table.add_row("examples", f"{st.examples:,}")
    table.add_row("tokens", f"{st.tokens:,}")
    table.add_row("loss-carrying tokens", f"{st.loss_tokens:,}")
    table.add_row("split into windows", f"{st.split:,}")
    table.add_row("truncated", f"{st.truncated:,}")
    table.add_row("dropped", f"{st.dropped:,}")
    out.print(table)
    for msg in bad[:5]:
        out.print(f"[yellow]skipped[/] {escape(msg)}")
    for why in st.drop_reasons[:3]:
        out.print(f"[yellow]dropped[/] {escape(why)}")
    if out.is_terminal:
        out.print("[bold green on grey15]highlighted[/] tokens carry the loss")
    else:
        out.print("tokens in \\[[ ]] carry the loss")
