"""``chatforge models``: what is available locally."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="List the models available locally.", no_args_is_help=True)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command("list")
def list_command() -> None:
    """Models usable offline: bundled ones, converted GGUFs and the hub cache."""
    from chatforge.models import list_local_models

    rows = list_local_models()
    table = Table(title="Local models")
    for col in ("model (--model)", "name", "params", "context", "format", "size", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.ref,
            r.name,
            f"{r.n_params / 1e6:.1f}M" if r.n_params else "-",
            str(r.context_length or "-"),
            r.prompt_format or "-",
            _size(r.size_bytes),
            r.status,
        )
    Console().print(table)
    if not rows:
        Console(stderr=True).print("No local models. `make chat` installs the default (smollm2).")
