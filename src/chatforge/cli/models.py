"""``chatforge models``: what is available locally, and removing it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from chatforge.cli.options import DeviceOpt, check_device
from chatforge.errors import ChatforgeError

app = typer.Typer(
    help="List, describe and remove the models available locally.", no_args_is_help=True
)

COLUMNS = (
    "model (--model)",
    "kind",
    "name",
    "params",
    "context",
    "format",
    "size",
    "from",
    "id",
    "status",
)

_SHORT = {"kind", "params", "context", "size", "id"}
_OPTIONAL = ("format", "context", "params", "status", "name")  # dropped first when narrow


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cells(r) -> list[str]:
    """One row of the listing as text (``-`` for what is unknown)."""
    return [
        r.ref,
        r.kind,
        r.name,
        f"{r.n_params / 1e6:.1f}M" if r.n_params else "-",
        str(r.context_length or "-"),
        r.prompt_format or "-",
        _size(r.size_bytes),
        r.source or "-",
        r.ident or "-",
        r.status,
    ]


def _recipe_cells(recipe) -> list[str]:
    """A named model's row: kind ``named``, from = its base (+ adapter)."""
    origin = recipe.base + (f" + adapter {recipe.adapter}" if recipe.adapter else "")
    return [recipe.name, "named", recipe.name, "-", "-", "-", "-", origin, "-", "recipe"]


def _plain(rows: list[list[str]]) -> str:
    """Aligned columns without colour, borders or truncation (for pipes and files)."""
    table = [list(COLUMNS), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(line.rstrip() for line in lines)


@app.command("list")
def list_command() -> None:
    """Models usable offline: bundled ones, converted GGUFs (the cache), trained models
    and the Hugging Face hub cache, each with its size on disk."""
    from chatforge.models import list_local_models
    from chatforge.models.recipes import list_recipes

    rows = [_cells(r) for r in list_local_models()]
    rows += [_recipe_cells(r) for r in list_recipes()]
    if not rows:
        typer.echo("No local models. `make chat` installs the default (smollm2).", err=True)
        return
    if not sys.stdout.isatty():
        typer.echo(_plain(rows))
        return
    _rich_table(rows)


def _fit(rows: list[list[str]], width: int) -> list[int]:
    """Indexes of the columns to show in ``width`` characters: the optional ones
    (format, context, params, status, name) go first on a narrow terminal."""
    keep = list(range(len(COLUMNS)))

    def needed() -> int:
        return sum(max(len(c) for c in [COLUMNS[i], *(r[i] for r in rows)]) + 3 for i in keep)

    for name in _OPTIONAL:
        if needed() <= width:
            break
        keep.remove(COLUMNS.index(name))
    return keep


def _rich_table(rows: list[list[str]]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    keep = _fit(rows, console.width)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i in keep:  # long values (names, paths) fold; short ones never wrap
        table.add_column(COLUMNS[i], overflow="fold", no_wrap=COLUMNS[i] in _SHORT)
    for cells in rows:
        table.add_row(*(cells[i] for i in keep))
    console.print(table)


def _info_rows(loaded) -> list[tuple[str, str]]:
    """What ``models info`` prints about a loaded model, as (label, value) rows."""
    from chatforge.device import device_name
    from chatforge.models.fast import native
    from chatforge.models.gguf import weights_source

    info = loaded.info
    kernels = native.kernel_path()
    if info.device != "cpu":  # our CPU kernels do not run there
        kernels = f"torch ops on {info.device} (the CPU kernels, {kernels}, are unused)"
    elif info.engine != "fast":
        kernels += " (unused: transformers' modules run this model)"
    quant = info.quantize if info.quantize != "none" else "none (full weights)"
    source = weights_source(info.path)  # a GGUF conversion holds no weights of its own
    return [
        ("model", info.ref),
        ("name", info.name),
        ("path", str(info.path)),
        ("weights", f"{source} (read from the file)" if source else str(info.path)),
        ("device", device_name(info.device)),
        ("architecture", info.architecture),
        ("parameters", f"{info.n_params / 1e6:.1f}M ({info.n_params:,})"),
        ("context length", str(info.context_length)),
        ("prompt format", info.prompt_format),
        ("dtype", info.dtype),
        ("quantisation", quant),
        ("engine", info.engine + (f" ({loaded.fast_reason})" if loaded.fast_reason else "")),
        ("kernels", kernels),
    ]


@app.command("info")
def info_command(
    ref: Annotated[str, typer.Argument(help="A bundled name, directory, .gguf file or hub id.")],
    device: DeviceOpt = "auto",
) -> None:
    """Load a model with the defaults `chatforge chat` uses and describe it: architecture,
    size, context, prompt format, the device, the dtype and quantisation picked, the
    engine and which kernels run it."""
    from chatforge.models import load_model
    from chatforge.models.recipes import load_recipe_model, resolve_named

    device = check_device(device)
    recipe = resolve_named(ref)
    loaded = load_recipe_model(recipe, device=device) if recipe else load_model(ref, device=device)
    rows = _info_rows(loaded)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        typer.echo(f"{label.ljust(width)}  {value}")


def _describe(target) -> str:
    what = "converted model" if target.kind == "converted" else "trained model"
    origin = f" (from {target.source})" if target.source else ""
    return f"{what} {target.name}{origin}, {_size(target.size_bytes)} at {target.path}"


@app.command("rm")
def rm_command(
    ref: Annotated[
        str, typer.Argument(help="A bundled name, GGUF path, cache id/hash or trained model.")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    delete_files: Annotated[
        bool,
        typer.Option("--delete-files", help="Also delete a trained model's directory."),
    ] = False,
) -> None:
    """Remove a named model, a converted model from the cache, or forget a trained model
    (its directory stays unless --delete-files). A bundled package's GGUF is never deleted."""
    from chatforge.models.recipes import get_recipe_quiet, remove_recipe
    from chatforge.models.registry import find_removal, remove

    recipe = get_recipe_quiet(ref)
    if recipe is not None:
        if delete_files:
            raise ChatforgeError(
                f"--delete-files applies to trained models; {ref!r} is a named model, whose "
                "base and adapter are never deleted by `models rm`"
            )
        what = f"named model {ref}" if isinstance(recipe, Path) else _describe_recipe(recipe)
        if not yes and not _confirm(f"Remove {what}? (its base and adapter stay)"):
            raise ChatforgeError("not confirmed: nothing removed (--yes skips the question)")
        remove_recipe(ref)
        typer.echo(f"Removed the named model {ref}.", err=True)
        return
    target = find_removal(ref)
    if target.kind == "converted":
        action = f"Remove {_describe(target)}?"
    elif delete_files:
        action = f"Forget and DELETE {_describe(target)}?"
    else:
        action = f"Forget {_describe(target)}? (its files stay)"
    if not yes and not _confirm(action):
        raise ChatforgeError("not confirmed: nothing removed (--yes skips the question)")
    remove(target, delete_files=delete_files)
    done = "Removed" if target.kind == "converted" or delete_files else "Forgot"
    typer.echo(f"{done} {target.name} ({target.path}).", err=True)


def _describe_recipe(recipe) -> str:
    adapter = f" + adapter {recipe.adapter}" if recipe.adapter else ""
    return f"named model {recipe.name} ({recipe.base}{adapter})"


@app.command("create")
def create_command(
    name: Annotated[str, typer.Argument(help="The new model's name: letters, digits and - _ . :")],
    base: Annotated[
        str,
        typer.Option(
            "--from",
            help="The base model: smollm2, a model directory, a .gguf file or a hub id.",
            show_default=False,
        ),
    ],
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    system_file: Annotated[
        Path | None,
        typer.Option("--system-file", help="Read the system prompt from this file."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="Generation preset: precise, balanced or creative."),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A generation setting, NAME=VALUE as the chat's /set takes it, e.g. "
            "temperature=0.3 or stop='User:|Bot:' (repeatable).",
        ),
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(
            "--adapter",
            help="A LoRA adapter directory (chatforge train --lora) to run on the base; "
            "its files are checked now.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Replace a named model of this name.")
    ] = False,
) -> None:
    """Name a model with its system prompt, generation settings and LoRA adapter (as
    Ollama's Modelfile): `chatforge chat NAME` and `generate --model NAME` then use them
    (flags given on the command line win). Nothing is copied or loaded."""
    from chatforge.models.recipes import create_recipe, parse_settings

    if system is not None and system_file is not None:
        raise ChatforgeError("give the system prompt once: --system or --system-file")
    if system_file is not None:
        try:
            system = system_file.expanduser().read_text(encoding="utf-8").rstrip("\n")
        except OSError as e:
            raise ChatforgeError(f"cannot read --system-file {system_file}: {e.strerror}") from e
        except UnicodeDecodeError:
            raise ChatforgeError(f"--system-file {system_file} is not UTF-8 text") from None
    recipe = create_recipe(
        name,
        base,
        system=system,
        preset=preset,
        params=parse_settings(settings or []),
        adapter=adapter,
        force=force,
    )
    typer.echo(f"Created {_describe_recipe(recipe)}: chatforge chat {recipe.name}", err=True)


@app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="A named model (`chatforge models create`).")],
) -> None:
    """Print a named model's recipe and the generation settings it resolves to."""
    from chatforge.models.recipes import get_recipe

    recipe = get_recipe(name)
    if recipe is None:
        raise ChatforgeError(
            f"no named model {name!r}; `chatforge models list` shows them (kind named)"
        )
    for line in _show_lines(recipe):
        typer.echo(line)


def _show_lines(recipe) -> list[str]:
    """What ``models show`` prints: the recipe, then every resolved setting."""
    import json

    from chatforge.generation.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PRESET

    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in recipe.params.items())
    rows = [
        ("name", recipe.name),
        ("base", recipe.base),
        ("adapter", recipe.adapter or "-"),
        ("system", recipe.system if recipe.system is not None else "-"),
        ("preset", recipe.preset or f"{DEFAULT_PRESET} (default)"),
        ("params", params or "-"),
        ("created", recipe.created or "-"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label.ljust(width)}  {value}" for label, value in rows]
    lines.append("generation settings (flags given to chat/generate override them):")
    config = recipe.generation_config()
    for key, value in config.to_dict().items():
        if key == "max_new_tokens" and value is None and config.max_length is None:
            value = f"{DEFAULT_MAX_NEW_TOKENS} (default)"
        lines.append(f"  {key} = {value}")
    return lines


def _confirm(question: str) -> bool:
    """Ask on the terminal; without an answer (end of input) the answer is no."""
    typer.echo(f"{question} [y/N] ", err=True, nl=False)
    answer = sys.stdin.readline()
    if not answer:
        typer.echo("", err=True)
    return answer.strip().lower() in ("y", "yes")
