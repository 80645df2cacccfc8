"""What both exports share (:mod:`chatforge.models.export` and its GGUF side,
:mod:`chatforge.models.export_gguf`): the request, its checks, atomic output.

A leaf below both, so neither imports the other's privates: ``export.py`` runs an
export and calls ``export_gguf.write_gguf`` for the GGUF format.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.conversation import detect_format
from chatforge.errors import ChatforgeError, ParamError
from chatforge.models.meta import ModelMeta

FORMATS = ("gguf", "hf")
QUANTIZE_CHOICES = ("f16", "q8_0", "q4_0")
DEFAULT_QUANTIZE = "f16"

# transformers model_type -> (llama.cpp architecture, Q/K rows permuted for its RoPE)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "gpt2": ("gpt2", False),
}


class ExportError(ChatforgeError):
    """A model cannot be exported as asked (unsupported architecture, tokenizer, target)."""


@dataclass
class ExportConfig:
    """What to export, where and how; validated on creation."""

    ref: str
    """The model: an alias, model directory, LoRA adapter directory or .gguf file."""
    out: Path
    """The file (gguf) or directory (hf) to write."""
    format: str = "gguf"
    """``gguf`` (llama.cpp) or ``hf`` (a transformers directory: vLLM, TGI)."""
    quantize: str | None = None
    """GGUF weight type: f16, q8_0 or q4_0; None = f16. Not allowed with ``hf``."""
    force: bool = False
    """Replace an existing output (else it is an error)."""

    def __post_init__(self) -> None:
        self.out = Path(self.out).expanduser()
        fmt = str(self.format).lower()
        if fmt not in FORMATS:
            raise ParamError("format", f"must be one of {', '.join(FORMATS)} (got {self.format!r})")
        self.format = fmt
        if self.quantize is not None:
            q = str(self.quantize).lower()
            if fmt == "hf":
                raise ParamError(
                    "quantize",
                    "applies to --format gguf only; an hf export keeps the full fp32 weights "
                    "(vLLM and TGI quantise at load time)",
                )
            if q not in QUANTIZE_CHOICES:
                raise ParamError(
                    "quantize",
                    f"must be one of {', '.join(QUANTIZE_CHOICES)} (got {self.quantize!r})",
                )
            self.quantize = q
        elif fmt == "gguf":
            self.quantize = DEFAULT_QUANTIZE


def check_architecture(model_type: str | None) -> str:
    """``model_type`` when a GGUF export supports it, else an :class:`ExportError`."""
    if model_type in ARCHITECTURES:
        return model_type
    supported = ", ".join(sorted(ARCHITECTURES))
    raise ExportError(
        f"cannot export architecture {model_type!r} to GGUF; supported: {supported} "
        "(--format hf exports any transformers model)"
    )


def prompt_format(tokenizer: Any, directory: Path) -> str:
    """The prompt format an export records: the model directory's, else detected."""
    meta = ModelMeta.read(directory)
    return detect_format(tokenizer, meta.prompt_format if meta else None)


# -- atomic output --------------------------------------------------------------


def temp_path(target: Path) -> Path:
    """A fresh hidden name beside ``target`` to write the export under."""
    return target.with_name(f".{target.name}.{os.getpid()}-{time.monotonic_ns()}.tmp")


def install(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` to ``target``; an existing target (``--force``) is
    set aside first and deleted only once the new one is in place."""
    old = None
    if target.is_dir() and not target.is_symlink():
        old = temp_path(target).with_suffix(".old")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
