"""What stands between a browser and a keyless server on localhost.

A web page the user visits can reach ``http://127.0.0.1:8000`` too. Two ways in,
and what closes them:

- **DNS rebinding**: the page's own domain is re-pointed at 127.0.0.1, so the
  browser treats our answers as same-origin and lets the page read them. The
  request still carries the attacker's name in ``Host``: :class:`HostGuard`
  answers 403 to any ``Host`` not on the allow-list (as Ollama does).
- **Cross-site "simple" requests**: a page may POST ``text/plain``, form data or
  a body with no content type to any origin without a CORS preflight. It cannot
  read the answer, but the model would still run. JSON routes accept only
  ``application/json`` (:func:`check_json_content_type`), which a cross-origin
  page can only send after a preflight that CORS (off by default) refuses.

With ``--api-key``, :class:`BearerAuth` asks every route but the public ones for it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from typing import Any

from chatforge.server.errors import APIError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host names always allowed (with any port)."""


PUBLIC_PATHS = frozenset(
    {"/health", "/", "/favicon.ico", "/static/chat.css", "/static/chat.js", "/static/markdown.js"}
)
"""Routes anyone may fetch without the API key: the health probe, and the static web
workbench (a browser cannot send a bearer token when it navigates; the page asks for the
key and sends it with its API calls)."""


class BearerAuth:
    """ASGI middleware: every route but the public ones needs ``Authorization: Bearer KEY``.

    Plain ASGI rather than ``@app.middleware("http")``, whose request wrapping hides
    client disconnects from the routes (which must see them to free batch places).
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                response = APIError(
                    401,
                    "missing or wrong API key; send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                ).response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(value: str) -> str:
    """``"[::1]:8000"`` -> ``"::1"``, ``"Example.com:80"`` -> ``"example.com"``."""
    value = value.strip().lower()
    if value.startswith("["):  # IPv6 literal, maybe with a port
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


class HostGuard:
    """ASGI middleware: 403 unless the ``Host`` header names an allowed host.

    Allowed: :data:`LOCAL_HOSTS`, the address the connection came in on (the bound
    host, or the interface's address when bound to 0.0.0.0), and ``allowed_hosts``
    (names or addresses, ports ignored; ``"*"`` allows every host). A request with
    no ``Host`` (HTTP/1.0; never a browser) is let through.
    """

    def __init__(self, app: Any, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        extra = {_host_name(h) for h in allowed_hosts if h.strip()}
        self.any = "*" in extra
        self.allowed = frozenset(LOCAL_HOSTS) | extra

    def allows(self, host: str, scope: dict) -> bool:
        if self.any or not host:
            return True
        name = _host_name(host)
        if name in self.allowed:
            return True
        server = scope.get("server")
        return bool(server) and name == _host_name(str(server[0]))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allows(host, scope):
                response = APIError(
                    403,
                    f"host {host!r} is not allowed; start the server with "
                    f"--allowed-host {_host_name(host)} to serve it",
                    code="host_not_allowed",
                ).response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_json_content_type(content_type: str | None) -> None:
    """Raise a 415 unless ``content_type`` is ``application/json`` (any parameters).

    A missing content type is refused too: a browser sends a body with none
    (``fetch(url, {method: "POST", body: blob})``) without a preflight, and
    ``curl -d`` sends form-urlencoded anyway, so curl users pass
    ``-H 'Content-Type: application/json'`` as OpenAI's own examples do.
    """
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != "application/json":
        shown = repr(content_type) if content_type else "none"
        raise APIError(
            415,
            f"the request body must be JSON sent with 'Content-Type: application/json' "
            f"(got {shown})",
            code="unsupported_media_type",
        )


def find_lone_surrogate(data: Any) -> tuple[str, str] | None:
    """The first string in decoded JSON that is not valid Unicode (a lone surrogate
    such as ``"\\ud800"``), as ``(param, escaped character)``; None if there is none.

    Iterative: the data may be nested as deep as the JSON decoder allowed.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return path, value[e.start].encode("unicode_escape").decode()
        elif isinstance(value, dict):
            items = [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
            stack.extend(reversed(items))
            keys = [k for k in value if not _valid(k)]
            if keys:
                return path or "body", keys[0].encode("unicode_escape").decode()
        elif isinstance(value, list):
            stack.extend(reversed([(f"{path}[{i}]", v) for i, v in enumerate(value)]))
    return None


def _valid(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
