"""Checking a LoRA adapter directory's files before any weights are loaded.

A truncated ``adapter_model.safetensors``, a broken ``adapter_config.json`` or a
missing weights file used to surface only after the base model had loaded (seconds),
through peft, as "does not fit the base model" (or a hub error about a repo id).
:func:`check_adapter_files` reads the config and the safetensors *header* only
(milliseconds) and names the file and what is wrong with it. Every place that
accepts an adapter calls it first: loading an adapter directory as a model, a named
model's ``--adapter``, ``serve --adapter``, ``POST /v1/adapters`` and
``Engine.add_adapter``.

This module imports neither torch nor peft, so the check costs no import time.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.errors import ModelLoadError
from chatforge.models.meta import ModelMeta

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# A safetensors header is JSON naming each tensor; beyond this it is not a header.
_MAX_HEADER = 100 << 20
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# Name parts of the tensors a peft LoRA adapter saves (DoRA adds a magnitude vector).
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_LORA_EXTRA = ("lora_magnitude_vector",)


class AdapterError(ModelLoadError):
    """A LoRA adapter that cannot be loaded, or cannot be applied to this model."""


@dataclass
class AdapterFiles:
    """What the check read: the parsed config, the weights file and its tensors' shapes."""

    directory: Path
    config: dict[str, Any]
    weights: Path
    shapes: dict[str, list[int]] = field(default_factory=dict)  # tensor name -> shape
    base: str | None = None  # the base model the directory records (None: names none)


def recorded_base(directory: Path, config: dict[str, Any] | None = None) -> str | None:
    """The base model an adapter directory records: chatforge's ``chatforge.json``
    (``extra.base_model``), else peft's ``base_model_name_or_path``; None when neither."""
    meta = ModelMeta.read(directory)
    base = meta.extra.get("base_model") if meta else None
    if not base and config is not None:
        base = config.get("base_model_name_or_path")
    return str(base) if isinstance(base, str | Path) and str(base).strip() else None


def adapter_base(directory: Path) -> str | None:
    """The base model a LoRA adapter directory records (chatforge's ``chatforge.json``,
    else peft's ``adapter_config.json``), or None when it names none. Unlike
    :func:`check_adapter_files`, a missing or broken config is no error here."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    return recorded_base(directory, config if isinstance(config, dict) else None)


def check_adapter_files(directory: str | Path, need_base: bool = True) -> AdapterFiles:
    """Check the LoRA adapter in ``directory`` without loading its weights.

    ``adapter_config.json`` must be a JSON object with the fields peft needs
    (``peft_type`` LORA, a positive integer ``r``, a numeric ``lora_alpha``, and
    ``target_modules`` as a name, a list of names or null); with ``need_base`` the
    directory must name its base model (callers that give the base need not).
    ``adapter_model.safetensors`` must be there, its header readable and consistent
    with the file's size, and its tensors LoRA pairs (``lora_A`` with ``lora_B`` of
    the same rank). Raises :class:`AdapterError` naming the file and the problem.
    """
    path = Path(directory).expanduser().absolute()  # messages name the file in full
    if not path.is_dir():
        raise AdapterError(f"LoRA adapter directory {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterError(f"{path} is not a LoRA adapter directory (no {CONFIG_FILE})")
    config = _read_config(cfg_file)
    base = recorded_base(path, config)
    if need_base and base is None:
        raise AdapterError(
            f"{cfg_file}: names no base model (base_model_name_or_path is missing or empty); "
            "set it to the model the adapter was trained on, or give the base explicitly"
        )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        others = sorted(p.name for p in path.glob("adapter_model*"))
        hint = (
            f" (it has {', '.join(others)}: re-save the adapter with safe_serialization=True)"
            if others
            else " (the adapter's weights are missing: copy the whole adapter directory)"
        )
        raise AdapterError(f"{weights}: no such file{hint}")
    shapes = _read_header(weights)
    _check_tensors(weights, shapes, config)
    return AdapterFiles(directory=path, config=config, weights=weights, shapes=shapes, base=base)


def _read_config(cfg_file: Path) -> dict[str, Any]:
    try:
        text = cfg_file.read_text(encoding="utf-8")
    except OSError as e:
        raise AdapterError(f"{cfg_file}: cannot be read ({e.strerror or e})") from e
    except UnicodeDecodeError:
        raise AdapterError(f"{cfg_file}: is not UTF-8 text (a damaged file?)") from None
    try:
        config = json.loads(text)
    except ValueError as e:
        raise AdapterError(f"{cfg_file}: is not valid JSON ({e}; a truncated file?)") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file}: is not a JSON object (got {type(config).__name__})")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterError(f"{cfg_file}: has no peft_type (peft needs it; LoRA's is LORA)")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type is {peft_type!r}; only LoRA adapters load")
    r = config.get("r", 8)  # peft's default when absent
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{cfg_file}: r (the rank) must be a positive integer (got {r!r})")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"{cfg_file}: lora_alpha must be a number (got {alpha!r})")
    targets = config.get("target_modules")
    ok = (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    )
    if not ok:
        raise AdapterError(
            f"{cfg_file}: target_modules must be a module name, a list of names or null "
            f"(got {targets!r})"
        )
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{cfg_file}: base_model_name_or_path must be a string (got {base!r})")
    return config


def _read_header(weights: Path) -> dict[str, list[int]]:
    """The tensors' shapes from a safetensors header, after checking the header and the
    offsets against the file's size (the data itself is not read)."""
    size = weights.stat().st_size
    try:
        with weights.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterError(
                    f"{weights}: is {size} bytes, too short for a safetensors file "
                    "(truncated or empty)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise AdapterError(
                    f"{weights}: is not a safetensors file (its first 8 bytes do not give "
                    "a header length)"
                )
            if 8 + n > size:
                raise AdapterError(
                    f"{weights}: is truncated: its header alone should take {8 + n} bytes "
                    f"but the file has {size}"
                )
            raw = f.read(n)
    except OSError as e:
        raise AdapterError(f"{weights}: cannot be read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AdapterError(
            f"{weights}: is not a safetensors file (its header is not JSON; damaged?)"
        ) from None
    if not isinstance(header, dict):
        raise AdapterError(f"{weights}: is not a safetensors file (its header is no JSON object)")
    data_size = size - 8 - n
    shapes: dict[str, list[int]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        what = _entry_problem(entry)
        if what is not None:
            raise AdapterError(f"{weights}: tensor {name!r} {what} (a damaged header?)")
        begin, stop = entry["data_offsets"]
        count = math.prod(entry["shape"])
        if stop - begin != count * _DTYPE_BYTES[entry["dtype"]]:
            raise AdapterError(
                f"{weights}: tensor {name!r} takes {stop - begin} bytes, but a "
                f"{entry['dtype']} tensor of shape {entry['shape']} takes "
                f"{count * _DTYPE_BYTES[entry['dtype']]} (a damaged header?)"
            )
        shapes[name] = list(entry["shape"])
        end = max(end, stop)
    if end > data_size:
        raise AdapterError(
            f"{weights}: is truncated: its tensors need {8 + n + end} bytes but the file has "
            f"{size} (copy it again)"
        )
    if end < data_size:
        raise AdapterError(
            f"{weights}: has {data_size - end} bytes after its last tensor: not the file its "
            "header describes (damaged, or two files written into one?)"
        )
    if not shapes:
        raise AdapterError(f"{weights}: holds no tensors")
    return shapes


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one tensor's header entry (None when nothing is)."""
    if not isinstance(entry, dict):
        return "has no dtype, shape and offsets"
    if entry.get("dtype") not in _DTYPE_BYTES:
        return f"has an unknown dtype {entry.get('dtype')!r}"
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"has a bad shape {shape!r}"
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        return f"has bad data offsets {offsets!r}"
    return None


def _check_tensors(weights: Path, shapes: dict[str, list[int]], config: dict[str, Any]) -> None:
    """Every tensor is a LoRA weight (or a module the config saves whole), each lora_A
    has its lora_B, and their ranks agree (with ``r`` where no per-module rank is set)."""
    saved = config.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else list(saved)
    pairs: dict[tuple[str, str], dict[str, list[int]]] = {}  # (module, kind) -> A/B shapes
    for name, shape in shapes.items():
        parts = name.split(".")
        which = next((p for p in parts if p in _LORA_PARTS), None)
        if which is None:
            if any(p in _LORA_EXTRA for p in parts):
                continue
            if any(s in parts for s in saved):  # a module saved whole (modules_to_save)
                continue
            raise AdapterError(
                f"{weights}: tensor {name!r} is not a LoRA weight (expected names like "
                "'...q_proj.lora_A.weight'): is this a full model's weights file?"
            )
        module = ".".join(parts[: parts.index(which)])
        kind = "embedding" if "embedding" in which else "linear"
        pairs.setdefault((module, kind), {})[which[-1]] = shape
    if not pairs:
        raise AdapterError(f"{weights}: holds no LoRA weights (no lora_A / lora_B tensors)")
    fixed_rank = None if config.get("rank_pattern") else config.get("r")
    for (module, _), ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            missing = "lora_B" if "B" not in ab else "lora_A"
            raise AdapterError(f"{weights}: {module} has no {missing} tensor (an incomplete file?)")
        a, b = ab["A"], ab["B"]
        if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
            raise AdapterError(
                f"{weights}: {module}'s lora_A {a} and lora_B {b} are not a rank-r pair"
            )
        if fixed_rank is not None and a[0] != fixed_rank:
            raise AdapterError(
                f"{weights}: {module} has rank {a[0]} but adapter_config.json says r={fixed_rank}"
            )
