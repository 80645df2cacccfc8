"""``chatforge publish``: serve a finished ``train --lora`` output in a running server,
the previous version of that name kept as ``NAME:vK`` (:mod:`chatforge.publish`)."""

from __future__ import annotations

from typing import Annotated

import typer


def publish_command(
    output: Annotated[
        str, typer.Argument(help="A finished LoRA training output (train --lora --output).")
    ],
    serve_to: Annotated[
        str,
        typer.Option(
            "--serve-to", metavar="URL", help="The running chatforge server (`chatforge serve`)."
        ),
    ] = "http://127.0.0.1:8000",
    as_name: Annotated[
        str | None,
        typer.Option(
            "--as",
            metavar="NAME",
            help="The model name clients call it by; the adapter served as NAME until now "
            "stays callable as NAME:v1 (then NAME:v2, ...). \\[default: the output folder's "
            "name]",
            show_default=False,
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="The served model it applies on. \\[default: the replaced version's, else "
            "the server's first model]",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="CHATFORGE_API_KEY",
            help="The server's --api-key (env CHATFORGE_API_KEY).",
            show_envvar=False,
        ),
    ] = None,
) -> None:
    """Load a finished LoRA training output into a running server under a name."""
    from chatforge.publish import publish_adapter, publish_name, server_key

    name = publish_name(as_name, output)
    result = publish_adapter(serve_to, name, output, base=base, api_key=server_key(api_key))
    typer.echo(result.describe())
