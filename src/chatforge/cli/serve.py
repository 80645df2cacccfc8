"""``chatforge serve``: the OpenAI-compatible API and web chat page over one or more
models (and LoRA adapters applied per request)."""

from __future__ import annotations

from typing import Annotated

import typer

from chatforge.cli.options import (
    DeviceOpt,
    DtypeOpt,
    QuantizeOpt,
    ThreadsOpt,
    check_device,
    check_threads,
)
from chatforge.errors import ChatforgeError, ParamError


def serve_command(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Model to serve: smollm2, a named model (`chatforge models create`), a model "
            "directory, a .gguf file or a hub id. Repeat to serve several; requests pick one "
            "by `model`, the first is the default (smollm2 when none is given).",
        ),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="Serve a LoRA adapter directory as model NAME, applied per request on the "
            "first --model (or on MODEL): NAME=DIR or NAME=DIR@MODEL. Repeatable.",
        ),
    ] = None,
    watch: Annotated[
        list[str] | None,
        typer.Option(
            "--watch",
            metavar="[NAME=]DIR",
            help="Serve each finished LoRA training output in DIR (train --lora --output DIR) "
            "as model NAME (default: DIR's folder name), the previous one kept as NAME:v1, "
            "NAME:v2, ...: DIR or NAME=DIR. Repeatable.",
        ),
    ] = None,
    ttl: Annotated[
        float | None,
        typer.Option(
            "--ttl",
            help="Unload a model idle for this many seconds (the next request loads it "
            "again). Default: keep models loaded.",
        ),
    ] = None,
    max_memory: Annotated[
        float | None,
        typer.Option(
            "--max-memory",
            help="Budget in MB for loaded models' weights: idle models are unloaded, least "
            "recently used first, to stay within it. Default: no budget.",
        ),
    ] = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    device: DeviceOpt = "auto",
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="CHATFORGE_API_KEY",
            help="Require 'Authorization: Bearer KEY' (env CHATFORGE_API_KEY).",
            show_envvar=False,
        ),
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests waiting for a batch place before 429.")
    ] = 64,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Sequences decoded together.")] = 32,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Largest max_tokens a request may ask for.")
    ] = 2048,
    max_n: Annotated[int, typer.Option("--max-n", help="Largest n (choices per request).")] = 8,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body, in bytes.")] = 1
    << 20,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
    threads: ThreadsOpt = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="Also accept requests whose Host header is this name (repeatable; '*' = any). "
            "Default: localhost names and the bound address (against DNS rebinding).",
        ),
    ] = None,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option(
            "--served-model-name",
            help="Name(s) clients use for the model (repeatable; the first is /v1/models' id).",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="Let web pages from this origin call the API (repeatable). Default: none.",
        ),
    ] = None,
    no_log: Annotated[
        bool,
        typer.Option(
            "--no-log",
            help="Keep no feedback: POST /v1/feedback (the page's thumbs, edits and picks) "
            "answers 501 instead of writing to the conversation log.",
        ),
    ] = False,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API, with a web chat page at /."""
    import uvicorn

    from chatforge.models import parse_dtype
    from chatforge.models.loading import parse_quantize
    from chatforge.server import Limits, create_app

    parse_dtype(dtype)
    quantize = parse_quantize(quantize or "auto")  # as `chatforge chat` does
    device = check_device(device)
    refs = list(model or ["smollm2"])
    if ttl is not None and ttl <= 0:
        raise ParamError("ttl", "must be > 0 seconds")
    if max_memory is not None and max_memory <= 0:
        raise ParamError("max_memory", "must be > 0 MB")
    if served_model_name and len(refs) > 1:
        raise ParamError(
            "served_model_name",
            "names a single --model; with several, name them with "
            "`chatforge models create` instead",
        )
    specs = served_models(refs, adapter or [], dtype, quantize, device)
    watches = watched_dirs(watch or [], specs)
    for name, value in (
        ("--port", port if 0 <= port < 65536 else -1),
        ("--max-queue", max_queue),
        ("--max-batch", max_batch),
        ("--max-tokens", max_tokens),
        ("--max-n", max_n),
        ("--max-body", max_body),
    ):
        if value < (0 if name in ("--port", "--max-queue") else 1):
            raise ChatforgeError(f"{name} is out of range")
    check_threads(threads)
    _check_address(host, port)  # before the model load, which can take a while
    load_errors: list[BaseException] = []

    def failed(e: BaseException) -> None:
        load_errors.append(e)
        server.should_exit = True

    app = create_app(
        models=specs,
        api_key=api_key or None,
        max_queue=max_queue,
        max_batch=max_batch,
        threads=threads,
        limits=Limits(max_tokens=max_tokens, max_n=max_n, max_body_bytes=max_body),
        allowed_hosts=[host, *(allowed_host or [])],
        cors_origins=list(cors_origin) if cors_origin else None,
        on_load_error=failed,
        ttl=ttl,
        max_memory_mb=max_memory,
        log=not no_log,
        watch=watches,
    )
    if served_model_name:  # the one model's names: the first is its id, all are listed
        route = app.state.chatforge.pool.default
        route.aliases |= {route.name, *served_model_name[1:]}
        route.name, route.listed_names = served_model_name[0], list(served_model_name[1:])
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=120
    )
    server = _draining_server(config, app.state.chatforge)
    names = ", ".join(s.name for s in specs)
    typer.echo(
        f"serving {names} on http://{host}:{port} (web chat at /, API at /v1)"
        + (", API key required" if api_key else ""),
        err=True,
    )
    for name, directory in watches:
        typer.echo(f"watching {directory} for training outputs to serve as {name!r}", err=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo("warning: listening beyond this machine without --api-key", err=True)
    server.run()
    if load_errors:
        e = load_errors[0]
        raise e if isinstance(e, ChatforgeError) else ChatforgeError(f"could not load: {e}")


def served_models(
    refs: list[str], adapters: list[str], dtype: str, quantize: str, device: str = "auto"
) -> list:
    """What ``--model`` and ``--adapter`` ask to serve, checked before anything loads.

    A named model runs on its base: models on one base share it in memory, and a
    named model's LoRA adapter is applied per request on it (not merged) when the
    adapter allows (no saved modules, no resized vocabulary); else that named model
    is loaded merged, as a model of its own.
    """
    from pathlib import Path

    from chatforge.models import load_model
    from chatforge.models.adapter_files import AdapterError, check_adapter_files
    from chatforge.models.recipes import load_recipe_model, resolve_named
    from chatforge.server import ServedModel

    def loader(ref: str):
        return lambda: load_model(ref, dtype=dtype, quantize=quantize, device=device)

    def key(ref: str) -> str:  # one base in memory however a model names it
        path = Path(ref).expanduser()
        return str(path.resolve()) if path.exists() else ref

    specs: list = []
    for ref in refs:
        recipe = resolve_named(ref)
        if recipe is None:
            specs.append(ServedModel(ref, loader(ref), base=key(ref)))
            continue
        defaults = recipe.generation_config()
        if recipe.adapter and not per_request_adapter(Path(recipe.adapter)):
            specs.append(
                ServedModel(
                    recipe.name,
                    lambda r=recipe: load_recipe_model(
                        r, dtype=dtype, quantize=quantize, device=device
                    ),
                    base=f"{recipe.name} (merged)",
                    system=recipe.system,
                    defaults=defaults,
                    own_names=False,
                )
            )
            continue
        specs.append(
            ServedModel(
                recipe.name,
                loader(recipe.base),
                base=key(recipe.base),
                adapter_dir=Path(recipe.adapter) if recipe.adapter else None,
                system=recipe.system,
                defaults=defaults,
                own_names=False,
            )
        )
    for item in adapters:
        name, sep, rest = item.partition("=")
        directory, _, on = rest.partition("@")
        if not sep or not name or not directory:
            raise ParamError("adapter", f"takes NAME=DIR or NAME=DIR@MODEL (got {item!r})")
        path = Path(directory).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ParamError(
                "adapter", f"{directory} is not a LoRA adapter directory (no adapter_config.json)"
            )
        try:  # its files now (milliseconds), not once the server has loaded the base
            check_adapter_files(path, need_base=False)
        except AdapterError as e:
            raise ParamError("adapter", f"{item}: {e}") from None
        host = next((s for s in specs if s.name == (on or specs[0].name)), None)
        if host is None:
            raise ParamError("adapter", f"{on!r} is not one of the --model values")
        if host.adapter_dir is not None or host.base.endswith("(merged)"):
            raise ParamError("adapter", f"{host.name!r} already has an adapter; name its base")
        specs.append(ServedModel(name, host.load, base=host.base, adapter_dir=path.resolve()))
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ParamError("model", f"{dup!r} is served twice; give each model its own name")
    return specs


def watched_dirs(items: list[str], specs: list) -> list:
    """``--watch DIR`` / ``--watch NAME=DIR`` as ``(name, absolute DIR)`` pairs, checked:
    a valid name (a DIR's folder name by default) that no model or other watch has."""
    from pathlib import Path

    from chatforge.publish import ADAPTER_NAME, PublishError, check_name

    pairs: list = []
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or not ADAPTER_NAME.match(name):  # a DIR that holds "=" is a DIR
            name, rest = "", item
        if not rest.strip():
            raise ParamError("watch", f"takes DIR or NAME=DIR (got {item!r})")
        directory = Path(rest).expanduser().absolute()
        if directory.exists() and not directory.is_dir():
            raise ParamError("watch", f": {rest} is not a directory")
        if not name:
            name = directory.name
            if not ADAPTER_NAME.match(name):
                raise ParamError(
                    "watch",
                    f": the folder name {name!r} is not a valid model name; name it: "
                    f"--watch NAME={rest}",
                )
        try:
            check_name(name, "--watch")
        except PublishError as e:
            raise ParamError("watch", str(e).removeprefix("--watch")) from None
        taken = {s.name for s in specs} | {n for n, _ in pairs}
        if name in taken:
            raise ParamError("watch", f": {name!r} is served already; name it: --watch NAME={rest}")
        pairs.append((name, directory))
    return pairs


def per_request_adapter(directory) -> bool:
    """Whether a LoRA adapter can be applied per request on its base: it changes only
    linear layers (no saved modules such as a resized embedding, no DoRA, no biases)."""
    import json

    from chatforge.models.fast.lora import unsupported_settings

    try:
        conf = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # loading it merged reports what is wrong
    return not unsupported_settings(conf)


def _check_address(host: str, port: int) -> None:
    """Bind ``host:port`` and let it go at once: a port in use (or a bad host) is then
    one line now, not a uvicorn traceback after the model has loaded.

    SO_REUSEADDR as uvicorn sets it, so a port whose last server left only
    TIME_WAIT connections behind is not mistaken for one in use. (Another program
    could still take the port between this check and uvicorn's bind; uvicorn
    then reports it.)
    """
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ChatforgeError(f"cannot listen on --host {host}: no such address ({e})") from e
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            why = "the port is already in use (another server?); stop it or pick another --port"
        elif e.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need privileges); pick another --port"
        elif e.errno == errno.EADDRNOTAVAIL:
            why = f"{host} is not an address of this machine; check --host"
        else:
            why = e.strerror or str(e)
        raise ChatforgeError(f"cannot listen on {host}:{port}: {why}") from e


def _draining_server(config, state):
    """uvicorn's Server, but SIGTERM/SIGINT first mark the app as draining.

    uvicorn then stops accepting connections and waits for in-flight requests
    to finish; a request that still arrives on an open keep-alive connection
    gets 503, and /health says "draining".
    """
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once shut down; after a graceful shutdown on
            # SIGTERM (what service managers send) we exit 0 instead of dying by it.
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return Server(config)
