"""``GET /``: the web chat page, one static HTML file, with the CLI's sampling presets filled in.

The page must start from the same settings as ``chatforge chat`` (the default preset),
so the server writes :data:`~chatforge.generation.config.PRESETS` and
:data:`~chatforge.generation.config.DEFAULT_PRESET` into it rather than the page
keeping a second copy of them.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from chatforge.generation.config import DEFAULT_PRESET, PRESETS

# The placeholder in static/index.html: /*CHATFORGE_SAMPLING*/{...}/*END*/
_SAMPLING = re.compile(r"/\*CHATFORGE_SAMPLING\*/.*?/\*END\*/", re.S)


def sampling_settings() -> dict:
    """The presets the page offers and the one it starts from (JSON-able)."""
    return {"default": DEFAULT_PRESET, "presets": {k: dict(v) for k, v in PRESETS.items()}}


@lru_cache(maxsize=1)
def render_page() -> str:
    """The chat page's HTML with the sampling presets written in."""
    html = resources.files("chatforge.server").joinpath("static/index.html").read_text("utf-8")
    # "</" cannot end the script early: JSON of numbers and names holds none, but be safe.
    data = json.dumps(sampling_settings()).replace("</", "<\\/")
    html, n = _SAMPLING.subn(lambda _: data, html, count=1)
    if n != 1:  # pragma: no cover - the file ships with the package
        raise RuntimeError("static/index.html has lost its sampling placeholder")
    return html


router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    """The web chat page (public: a browser cannot send a key when it navigates)."""
    return HTMLResponse(render_page())
