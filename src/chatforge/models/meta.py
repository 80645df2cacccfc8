"""``chatforge.json``: what chatforge records in a model directory it writes.

The prompt format is recorded so that loading the directory later needs no
flag; ``complete`` marks a finished conversion (a directory without it is a
partial write and is ignored).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

META_FILE = "chatforge.json"


@dataclass
class ModelMeta:
    """Facts about a model directory that its config files do not say."""

    prompt_format: str | None = None  # "chat_template" | "sep" | "eos"; None = detect
    name: str | None = None  # display name, e.g. "SmolLM2-135M-Instruct"
    source: str | None = None  # where it came from (a .gguf path, a base model)
    complete: bool = True  # False while a conversion or save is in progress
    extra: dict = field(default_factory=dict)  # anything else (training run facts)

    @classmethod
    def read(cls, directory: Path) -> ModelMeta | None:
        """The recorded metadata, or None when the directory has none (or it is unreadable)."""
        path = Path(directory) / META_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        known = {k: data[k] for k in ("prompt_format", "name", "source", "complete") if k in data}
        return cls(**known, extra=data.get("extra") or {})

    def write(self, directory: Path) -> None:
        """Write atomically (temp file + fsync + rename) so a crash never leaves half a file."""
        from chatforge.fsutil import atomic_write

        atomic_write(Path(directory) / META_FILE, json.dumps(asdict(self), indent=2))
