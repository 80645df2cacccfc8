"""Putting a finished LoRA training output into a running chatforge server.

``chatforge train ... --serve-to URL --as NAME`` (:func:`publish_after_training`),
:func:`publish_adapter` in Python and ``chatforge serve --watch DIR``
(:mod:`chatforge.server.watch`) all do the same thing, :func:`publish_with`:

1. check that the directory holds a *finished* LoRA output: ``chatforge.json``,
   written last by training, says ``complete``; ``adapter_config.json`` and
   ``adapter_model.safetensors`` pass :func:`~chatforge.models.adapter_files.check_adapter_files`;
2. copy its adapter files into a snapshot, ``$CHATFORGE_DATA/published/NAME/<digest>/``
   (one per distinct adapter), which is what the server reads: the next run may
   overwrite the output directory (``--overwrite``) while this version is still served,
   and a server that unloads an idle base (``--ttl``) reads its adapters again;
3. if ``NAME`` is served already, serve its current adapter under the next free
   versioned name ``NAME:vK`` (``K`` one above the highest served) *before* ``NAME``
   is replaced, so clients calling ``NAME`` get the new adapter and ``NAME:vK`` keeps
   answering as the previous one; if replacing fails, ``NAME:vK`` is taken away again
   and ``NAME`` serves what it served before.

The steps that talk to the server go through an :class:`AdapterOps`: HTTP
(``/v1/adapters``) for :func:`publish_adapter`, the server's own model pool for
``--watch``. This module is a leaf: it imports nothing from the server (which takes
its name rule, :data:`ADAPTER_NAME`, from here) and no torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from chatforge.errors import ChatforgeError
from chatforge.models.adapter_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    check_adapter_files,
)
from chatforge.models.meta import META_FILE, ModelMeta

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
"""A name an adapter may be served under: letters, digits and ``_.:/-``, 128 at most."""

VERSION_MARK = ":v"
"""What joins a name and a kept version's number: ``bot:v1``, ``bot:v2``."""

SNAPSHOT_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)
"""The files of an output the server needs to serve it as an adapter."""

DEFAULT_TIMEOUT = 300.0
"""Seconds to wait for the server to load an adapter (its base may have to load first)."""

OutputState = Literal["missing", "unfinished", "full", "lora"]


class PublishError(ChatforgeError):
    """An adapter could not be put into the server; the message says why (one line)."""


# ------------------------------------------------------------------ the output and its name


def output_state(directory: str | Path) -> OutputState:
    """What ``directory`` holds: ``missing`` (no such directory), ``unfinished`` (no
    ``chatforge.json``, or one written before the end of the run), ``full`` (a finished
    model that is not a LoRA adapter) or ``lora`` (a finished LoRA output)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        return "missing"
    meta = ModelMeta.read(path)
    if meta is None or not meta.complete:
        return "unfinished"
    return "lora" if (path / CONFIG_FILE).is_file() else "full"


def finished_lora(directory: str | Path) -> Path:
    """``directory``, absolute, after checking it holds a finished LoRA output
    (:func:`output_state` and the adapter files); a :class:`PublishError` otherwise."""
    path = Path(directory).expanduser().absolute()
    state = output_state(path)
    if state == "missing":
        why = "is not a directory" if path.exists() else "does not exist"
        raise PublishError(f"{path} {why}")
    if state == "unfinished":
        detail = (
            f"no {META_FILE}"
            if not (path / META_FILE).exists()
            else f"its {META_FILE} says the run has not finished"
        )
        raise PublishError(f"{path} has no finished model yet ({detail})")
    if state == "full":
        raise PublishError(
            f"{path} is a full model, not a LoRA adapter: serve it with `chatforge serve -m {path}`"
        )
    try:
        check_adapter_files(path, need_base=False)
    except AdapterError as e:
        raise PublishError(str(e)) from None
    return path


def check_name(name: str, what: str = "--as") -> str:
    """``name`` when it is a valid adapter name (:data:`ADAPTER_NAME`) with room left for
    a version suffix; a :class:`PublishError` naming ``what`` otherwise."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name) or len(name) > 120:
        raise PublishError(
            f"{what}: {name!r} is not a valid model name (letters, digits and _.:/-, "
            "starting with a letter or digit, 120 characters at most)"
        )
    return name


def default_name(directory: str | Path) -> str:
    """The name an output is served under when none is given: its folder's name."""
    return Path(directory).expanduser().absolute().name


def version_name(name: str, taken: Iterable[str]) -> str:
    """``NAME:vK``: ``K`` one above the highest version of ``name`` in ``taken`` (1 when
    none), so a number is never reused while a later one is served."""
    prefix = name + VERSION_MARK
    numbers = [0]
    for other in taken:
        if other.startswith(prefix) and other[len(prefix) :].isdigit():
            numbers.append(int(other[len(prefix) :]))
    return f"{prefix}{max(numbers) + 1}"


# ------------------------------------------------------------------ snapshots


def adapter_digest(directory: Path) -> str:
    """SHA-256 over the adapter's config and weights (what makes it this adapter)."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update(name.encode() + b"\0")
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def snapshots_dir() -> Path:
    """Where published adapters are copied: ``$CHATFORGE_DATA/published``."""
    from chatforge.paths import data_dir

    return data_dir() / "published"


def snapshot(directory: Path, name: str) -> Path:
    """A copy of the adapter files of ``directory`` that nothing else writes to:
    ``published/NAME/<digest>/`` (the same adapter published again reuses its copy).
    Written into a temporary folder and renamed, so a copy is whole or absent."""
    digest = adapter_digest(directory)
    folder = snapshots_dir() / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    dest = folder / digest[:16]
    if all((dest / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{digest[:16]}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for f in SNAPSHOT_FILES:
            if (directory / f).is_file():
                shutil.copy2(directory / f, tmp / f)
        if adapter_digest(tmp) != digest:  # the output changed while it was copied
            raise PublishError(f"{directory} changed while it was being copied; try again")
        shutil.rmtree(dest, ignore_errors=True)  # a partial copy from an earlier crash
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------ the one sequence


@dataclass
class ServedAdapter:
    """An adapter a server serves: its name, the directory it reads, its base's name."""

    name: str
    path: Path | None
    base: str | None = None


class AdapterOps(Protocol):
    """How :func:`publish_with` reaches a server; failures raise :class:`PublishError`."""

    def served(self) -> dict[str, ServedAdapter]:
        """The adapters served, by name."""

    def names(self) -> set[str]:
        """Every name the server answers to (models and adapters)."""

    def add(self, name: str, path: Path, base: str | None) -> None:
        """Serve the adapter in ``path`` as ``name`` (replacing an adapter of that name)."""

    def remove(self, name: str) -> None:
        """Stop serving adapter ``name``."""


@dataclass
class PublishResult:
    """What :func:`publish_with` did."""

    name: str
    """The name the new adapter is served under."""
    source: Path
    """The training output it came from."""
    path: Path
    """The snapshot the server reads it from."""
    base: str | None = None
    """The model it is applied on (None: the server's default)."""
    kept_as: str | None = None
    """The name the previous version is now served under (None: there was none kept)."""
    note: str | None = None
    """Why no previous version was kept although ``name`` was served, if so."""

    def describe(self) -> str:
        """One line for the user."""
        line = f"serving {self.source} as {self.name!r}"
        if self.kept_as:
            line += f"; the previous version is now {self.kept_as!r}"
        elif self.note:
            line += f" ({self.note})"
        return line


def publish_with(
    ops: AdapterOps, name: str, directory: str | Path, base: str | None = None
) -> PublishResult:
    """Serve the finished LoRA output ``directory`` as ``name`` through ``ops``, keeping
    a previous adapter of that name as ``NAME:vK`` (see the module docstring). ``base``:
    the model it applies on (default: that of the version it replaces, else the
    server's default). Raises :class:`PublishError`; nothing changes on the server
    unless the new adapter is served."""
    check_name(name)
    source = finished_lora(directory)
    path = snapshot(source, name)
    old = ops.served().get(name)
    kept_as = note = None
    if old is not None:
        base = base if base is not None else old.base
        what = _previous(old, source, path)
        if what is None and old.path is not None:
            kept_as = version_name(name, ops.names())
            ops.add(kept_as, old.path, old.base)
        else:
            note = what
    try:
        ops.add(name, path, base)
    except PublishError:
        if kept_as is not None:  # back as it was: NAME still serves the previous version
            try:
                ops.remove(kept_as)
            except PublishError:
                pass
        raise
    return PublishResult(name, source, path, base, kept_as, note)


def _previous(old: ServedAdapter, source: Path, path: Path) -> str | None:
    """None when the previous adapter can be kept; else why it is not."""
    if old.path is None:
        return "the previous version has no directory: not kept"
    prev = Path(old.path)
    if prev.resolve() == path.resolve():
        return "the same adapter as before"
    if prev.resolve() == source.resolve():
        return f"the previous version was read from {source}, which holds this one now: not kept"
    try:
        check_adapter_files(prev, need_base=False)
        same = adapter_digest(prev) == adapter_digest(path)
    except (AdapterError, OSError):
        return f"the previous version's files at {prev} are gone: not kept"
    return "the same adapter as before" if same else None


# ------------------------------------------------------------------ over HTTP


def api_root(url: str) -> str:
    """``url`` without a trailing ``/`` or ``/v1`` (both spellings are taken)."""
    root = url.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    if not re.match(r"^https?://[^/\s]+", root):
        raise PublishError(
            f"--serve-to: {url!r} is not a server address; give one like http://127.0.0.1:8000"
        )
    return root


class HttpAdapterOps:
    """:class:`AdapterOps` over a chatforge server's ``/v1/adapters`` and ``/v1/models``."""

    def __init__(
        self, api_base: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        import httpx

        self.url = api_root(api_base)
        self.has_key = bool(api_key)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> HttpAdapterOps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, route: str, body: dict | None = None) -> Any:
        """``method route`` as JSON; a one-line :class:`PublishError` for every failure."""
        import httpx

        try:
            r = self.client.request(method, route, json=body)
        except httpx.TransportError as e:
            raise PublishError(
                f"no chatforge server at {self.url}: {e or type(e).__name__}; "
                "start one with `chatforge serve`"
            ) from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code < 400:
            if data is None:
                raise PublishError(f"{self.url} is not a chatforge server ({route} is not JSON)")
            return data
        message = _error_message(data) or r.reason_phrase
        if r.status_code == 401:
            hint = (
                "the server refused the API key: check --api-key"
                if self.has_key
                else "the server wants an API key: pass it with --api-key (or CHATFORGE_API_KEY)"
            )
            raise PublishError(f"{self.url} answered 401 ({message}); {hint}")
        if r.status_code in (404, 405) and route == "/v1/adapters" and method == "GET":
            raise PublishError(f"{self.url} is not a chatforge server (no /v1/adapters)")
        raise PublishError(f"{self.url} answered {r.status_code}: {message}")

    def served(self) -> dict[str, ServedAdapter]:
        data = self.call("GET", "/v1/adapters").get("data") or []
        return {
            a["name"]: ServedAdapter(a["name"], _path(a.get("path")), a.get("base"))
            for a in data
            if isinstance(a, dict) and a.get("name")
        }

    def names(self) -> set[str]:
        cards = self.call("GET", "/v1/models").get("data") or []
        return {c["id"] for c in cards if isinstance(c, dict) and c.get("id")} | set(self.served())

    def add(self, name: str, path: Path, base: str | None) -> None:
        body = {"name": name, "path": str(path)}
        if base is not None:
            body["base"] = base
        self.call("POST", "/v1/adapters", body)

    def remove(self, name: str) -> None:
        self.call("DELETE", f"/v1/adapters/{name}")


def _path(value: Any) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None


def _error_message(data: Any) -> str | None:
    """The message of an OpenAI-shaped error body (or FastAPI's ``detail``)."""
    if not isinstance(data, dict):
        return None
    inner = data.get("error", data)
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        return inner["message"]
    detail = data.get("detail")
    return detail if isinstance(detail, str) else None


def publish_adapter(
    api_base: str,
    name: str,
    directory: str | Path,
    base: str | None = None,
    api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> PublishResult:
    """Serve the finished LoRA output ``directory`` as model ``name`` on the chatforge
    server at ``api_base`` (``http://127.0.0.1:8000``, with or without ``/v1``), keeping
    an adapter already served as ``name`` under ``NAME:vK``.

    ``base``: the model it applies on (default: the replaced version's, else the
    server's first model). ``api_key``: the server's ``--api-key``. ``timeout``: seconds
    to wait for the server to load it. The server reads the adapter from a snapshot of
    its files on this machine (see :func:`snapshot`), so the two must share a file
    system. Raises :class:`PublishError` with a one-line message.

    >>> publish_adapter("http://127.0.0.1:8000", "dreams", "dreams-lora/")  # doctest: +SKIP
    PublishResult(name='dreams', ..., kept_as='dreams:v1')
    """
    check_name(name)
    finished_lora(directory)  # its errors before the server's
    with HttpAdapterOps(api_base, api_key, timeout) as ops:
        return publish_with(ops, name, directory, base)


# ------------------------------------------------------------------ for `chatforge train`


def publish_name(as_name: str | None, out_dir: str | Path) -> str:
    """The name an output is served under: ``as_name`` (``--as``), else the output
    folder's name; a :class:`PublishError` when it is not a valid model name."""
    if as_name is None:
        name = default_name(out_dir)
        if not ADAPTER_NAME.match(name) or len(name) > 120:
            raise PublishError(
                f"the output folder's name {name!r} is not a valid model name; "
                "give one with --as NAME"
            )
        return name
    return check_name(as_name)


def check_publish_target(
    serve_to: str | None,
    as_name: str | None,
    out_dir: str | Path,
    api_key: str | None = None,
    timeout: float = 10.0,
) -> str | None:
    """The checks ``train --serve-to URL --as NAME`` makes before training starts: the
    name (default: the output folder's), and that a chatforge server answers at
    ``serve_to`` with this key (``GET /v1/adapters``). Returns the name (None without
    ``--serve-to``); raises :class:`PublishError`."""
    if serve_to is None:
        if as_name is not None:
            raise PublishError("--as names the model in a running server: give --serve-to URL")
        return None
    name = publish_name(as_name, out_dir)
    with HttpAdapterOps(serve_to, server_key(api_key), timeout) as ops:
        ops.served()
    return name


def publish_after_training(
    out_dir: str | Path,
    serve_to: str,
    as_name: str | None = None,
    api_key: str | None = None,
) -> str:
    """Serve a finished ``train --lora`` output in the running server at ``serve_to`` as
    ``as_name`` (default: the output folder's name); returns the line to print. On
    failure a :class:`PublishError` says the model is saved, why it was not loaded,
    and the command that loads it later."""
    try:
        name = publish_name(as_name, out_dir)
        return publish_adapter(serve_to, name, out_dir, api_key=server_key(api_key)).describe()
    except PublishError as e:
        name = as_name or default_name(out_dir)
        out = Path(out_dir).expanduser().absolute()
        raise PublishError(
            f"the trained model is saved in {out}, but it was not loaded into {serve_to}: "
            f"{e}; to load it later: chatforge publish {out} --serve-to {serve_to} --as {name}"
        ) from None


def server_key(api_key: str | None) -> str | None:
    """``api_key``, else ``$CHATFORGE_API_KEY`` (what ``chatforge serve --api-key`` reads)."""
    from chatforge.openai_api import API_KEY_ENV

    return api_key or os.environ.get(API_KEY_ENV) or None


__all__ = [
    "ADAPTER_NAME",
    "AdapterOps",
    "HttpAdapterOps",
    "PublishError",
    "PublishResult",
    "ServedAdapter",
    "check_name",
    "check_publish_target",
    "finished_lora",
    "output_state",
    "publish_adapter",
    "publish_after_training",
    "publish_name",
    "publish_with",
    "server_key",
    "snapshot",
    "version_name",
]
