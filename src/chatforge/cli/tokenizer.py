"""``chatforge tokenizer train``: a byte-level BPE tokenizer trained on your data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chatforge.errors import ChatforgeError

app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)


@app.command("train")
def train_tokenizer_command(
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="Text/JSONL file, folder, or chitchat.")
    ],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Tokenizer directory to write.")],
    data_format: Annotated[
        str | None, typer.Option("--data-format", help="Override the detected data kind.")
    ] = None,
    min_frequency: Annotated[
        int, typer.Option("--min-frequency", help="Least count of a merged pair.")
    ] = 2,
    on_error: Annotated[str, typer.Option("--on-error", help="skip or fail.")] = "skip",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DIR.")] = False,
) -> None:
    """Train a byte-level BPE tokenizer with the <|endoftext|> and <sep> special tokens."""
    from rich.console import Console

    from chatforge.training.data import load_data
    from chatforge.training.tokenizer import MIN_VOCAB, train_tokenizer

    err = Console(stderr=True)
    if vocab_size < MIN_VOCAB:
        raise ChatforgeError(f"--vocab-size must be >= {MIN_VOCAB} (256 bytes + special tokens)")
    if min_frequency < 1:
        raise ChatforgeError("--min-frequency must be >= 1")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ChatforgeError(f"output {out} exists and is not empty; pass --overwrite to replace")
    bad: list[str] = []
    ds = load_data(data, data_format, on_error, bad.append)
    if bad:
        err.print(f"[yellow]skipped {len(bad)} malformed line(s)[/] (first: {bad[0]})")
    tok = train_tokenizer(ds, vocab_size, out, min_frequency=min_frequency)
    err.print(f"wrote a {len(tok):,}-token byte-level BPE tokenizer to {out}")
