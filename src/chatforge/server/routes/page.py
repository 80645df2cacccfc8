"""``GET /``: the web workbench, static files (HTML, one stylesheet, two scripts) with the
CLI's sampling presets written into the HTML.

The page must start from the same settings as ``chatforge chat`` (the default preset),
so the server writes :data:`~chatforge.generation.config.PRESETS`,
:data:`~chatforge.generation.config.DEFAULT_PRESET` and the CLI's reply length into it
rather than the page keeping a second copy of them. The files are public (a browser
cannot send a bearer token when it navigates; the page asks for the key and sends it
with its API calls), so each is listed in :data:`~chatforge.server.guard.PUBLIC_PATHS`.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from chatforge.conversation.budget import DEFAULT_MAX_NEW_TOKENS
from chatforge.generation.config import DEFAULT_PRESET, PRESETS
from chatforge.server.errors import APIError
from chatforge.server.guard import PUBLIC_PATHS

# The placeholder in static/index.html: /*CHATFORGE_SAMPLING*/{...}/*END*/
_SAMPLING = re.compile(r"/\*CHATFORGE_SAMPLING\*/.*?/\*END\*/", re.S)

ASSETS = {
    "chat.css": "text/css; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
}
"""The files the page loads from ``/static/`` (no other name is served from there)."""

# A second wall behind the page's escaping: only our own scripts run (the presets are a
# JSON data block, which is not executed), and nothing is sent anywhere but this server.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new chatforge's page, not a stale cached one
}


def sampling_settings() -> dict:
    """The presets the page offers, the one it starts from and its reply length (JSON-able)."""
    return {
        "default": DEFAULT_PRESET,
        "presets": {k: dict(v) for k, v in PRESETS.items()},
        "max_tokens": DEFAULT_MAX_NEW_TOKENS,
    }


def _static(name: str) -> str:
    return resources.files("chatforge.server").joinpath("static", name).read_text("utf-8")


@lru_cache(maxsize=1)
def render_page() -> str:
    """The page's HTML with the sampling presets written in."""
    # "</" cannot end the data block early: JSON of numbers and names holds none, but be safe.
    data = json.dumps(sampling_settings()).replace("</", "<\\/")
    html, n = _SAMPLING.subn(lambda _: data, _static("index.html"), count=1)
    if n != 1:  # pragma: no cover - the file ships with the package
        raise RuntimeError("static/index.html has lost its sampling placeholder")
    return html


router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    """The web workbench (public: the page asks for the API key itself)."""
    return HTMLResponse(render_page(), headers=_HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    """The page's stylesheet and scripts."""
    if name not in ASSETS or f"/static/{name}" not in PUBLIC_PATHS:
        raise APIError(404, f"no static file {name!r}")
    return Response(_static(name), media_type=ASSETS[name], headers=_HEADERS)
