"""Where chatforge keeps converted models (cache) and logs/history (data).

``CHATFORGE_CACHE`` and ``CHATFORGE_DATA`` override the defaults, which follow
the XDG base-directory convention (``$XDG_CACHE_HOME/chatforge``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir, user_data_dir


def cache_dir() -> Path:
    """Root of the conversion cache (converted GGUF models live under ``models/``)."""
    env = os.environ.get("CHATFORGE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() / "chatforge" if xdg else Path(user_cache_dir("chatforge"))


def data_dir() -> Path:
    """Root of user data: the conversation log and the chat input history."""
    env = os.environ.get("CHATFORGE_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg).expanduser() / "chatforge" if xdg else Path(user_data_dir("chatforge"))


def models_cache_dir() -> Path:
    return cache_dir() / "models"
