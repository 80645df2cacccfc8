"""The ``chatforge`` command: one typed function per command, no logic of its own."""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.24 vendors click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc  # type: ignore[no-redef]

from chatforge.cli import bench as bench_cli
from chatforge.cli import data as data_cli
from chatforge.cli import logs as logs_cli
from chatforge.cli import models as models_cli
from chatforge.cli import tokenizer as tokenizer_cli
from chatforge.cli.chat import chat_command
from chatforge.cli.compare import compare_command
from chatforge.cli.eval import eval_command
from chatforge.cli.export import export_command
from chatforge.cli.generate import generate_command
from chatforge.cli.publish import publish_command
from chatforge.cli.serve import serve_command
from chatforge.cli.train import train_command

_NO_ARGS = getattr(click_exc, "NoArgsIsHelpError", ())

app = typer.Typer(
    name="chatforge",
    help="Train, fine-tune, chat with, batch-run and serve conversational language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from chatforge import __version__

        print(f"chatforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train, fine-tune, chat with, batch-run and serve conversational language models."""


app.command("chat")(chat_command)
app.command("generate")(generate_command)
app.command("compare")(compare_command)
app.command("serve")(serve_command)
app.add_typer(models_cli.app, name="models")
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("export")(export_command)
app.command("publish")(publish_command)
app.add_typer(data_cli.app, name="data")
app.add_typer(tokenizer_cli.app, name="tokenizer")
app.add_typer(bench_cli.app, name="bench")
app.add_typer(logs_cli.app, name="logs")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2; a bug
    (any other exception) shows its traceback and exits 1."""
    from chatforge.errors import ChatforgeError

    try:
        # Not standalone, click hands back the code of a command's typer.Exit(code).
        code = app(args=argv, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 130
    except _NO_ARGS as e:  # `chatforge` alone prints the help
        print(e.format_message(), file=sys.stderr)
        return 0
    except click_exc.ClickException as e:  # bad flag value, unknown option, ...
        print(f"error: {e.format_message()} (see --help)", file=sys.stderr)
        return 2
    except ChatforgeError as e:  # the user's to fix: the message says how
        from chatforge.cli.options import user_message

        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # the system's (disk full, no permission): not a bug
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        return _report_bug(e)


def _report_bug(error: Exception) -> int:
    """Show an unexpected exception as the bug it is: its traceback, then a line
    saying so. Returns the exit code (1, as for any uncaught exception)."""
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    print(
        f"error: this is a bug in chatforge ({type(error).__name__}: {error}); "
        "please report it with the traceback above",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
