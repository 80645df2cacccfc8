"""What a model directory says about its model, read without loading it.

``chatforge.json`` (:class:`ModelMeta`) is what chatforge records in a model
directory it writes. The prompt format is recorded so that loading the directory
later needs no flag; ``complete`` marks a finished conversion (a directory without
it is a partial write and is ignored). The helpers below read the other facts the
model list and the loader need from a directory's files (the context length from a
config, the parameter count from safetensors headers), importing neither torch nor
transformers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatforge.fsutil import atomic_write

META_FILE = "chatforge.json"
# The engine's saved decoders in a converted model's directory (models/fast/packed.py):
# ``fast-*.safetensors``, files of the engine, not weights of the model.
PACK_PREFIX = "fast-"
# Context lengths above this are tokenizer placeholders ("no limit"), not real limits.
_HUGE = 10**8


@dataclass
class ModelMeta:
    """Facts about a model directory that its config files do not say."""

    prompt_format: str | None = None  # "chat_template" | "sep" | "eos" | "text"; None = detect
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
        atomic_write(Path(directory) / META_FILE, json.dumps(asdict(self), indent=2))


def context_length_of(config: Any, tokenizer: Any = None) -> int:
    """The model's context length: positions from its config, else the tokenizer's limit."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and 0 < value < _HUGE:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _HUGE:
        return limit
    return 2048


def params_from_safetensors(directory: Path) -> int | None:
    """Parameter count read from safetensors headers (no weights loaded, no torch import:
    the header is 8 bytes of length then JSON with each tensor's shape); None where the
    directory has no safetensors weights."""
    total = 0
    # fast-*.safetensors: the engine's saved decoder (models/fast/packed.py), not the model.
    files = [f for f in directory.glob("*.safetensors") if not f.name.startswith(PACK_PREFIX)]
    if not files:
        return None
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            n = 1
            for d in entry["shape"]:
                n *= d
            total += n
    return total
