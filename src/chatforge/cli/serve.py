"""``chatforge serve``: the OpenAI-compatible API and web chat page over one model."""

from __future__ import annotations

from typing import Annotated

import typer

from chatforge.cli.options import DtypeOpt, ModelOpt, QuantizeOpt, ThreadsOpt, check_threads
from chatforge.errors import ChatforgeError


def serve_command(
    model: ModelOpt = "smollm2",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
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
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a web chat page at /."""
    import uvicorn

    from chatforge.models import load_model, parse_dtype
    from chatforge.models.loading import parse_quantize
    from chatforge.server import Limits, create_app

    parse_dtype(dtype)
    quantize = parse_quantize(quantize or "auto")  # as `chatforge chat` does
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
        lambda: load_model(model, dtype=dtype, quantize=quantize),
        api_key=api_key or None,
        max_queue=max_queue,
        max_batch=max_batch,
        threads=threads,
        limits=Limits(max_tokens=max_tokens, max_n=max_n, max_body_bytes=max_body),
        model_id=model,
        allowed_hosts=[host, *(allowed_host or [])],
        cors_origins=list(cors_origin) if cors_origin else None,
        served_model_names=served_model_name or (),
        on_load_error=failed,
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=120
    )
    server = _draining_server(config, app.state.chatforge)
    typer.echo(
        f"serving {model} on http://{host}:{port} (web chat at /, API at /v1)"
        + (", API key required" if api_key else ""),
        err=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo("warning: listening beyond this machine without --api-key", err=True)
    server.run()
    if load_errors:
        e = load_errors[0]
        raise e if isinstance(e, ChatforgeError) else ChatforgeError(f"could not load {model}: {e}")


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
