"""Turn a model reference into a local model directory.

References, in the order they are tried:

* an alias (``smollm2``): a model shipped by a Python package, converted once;
* a path to a ``.gguf`` file: converted once into the cache;
* a path to a Hugging Face model directory (config + safetensors + tokenizer);
* a hub id (``owner/name``): from the local hub cache, or downloaded where the
  hub is reachable; offline it fails fast with a clear message.

Nothing here reads weights or imports torch: :mod:`chatforge.models.loading` loads
the directory this finds.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from chatforge.errors import ModelLoadError
from chatforge.models.gguf import ensure_converted, weights_in_gguf
from chatforge.models.meta import ModelMeta
from chatforge.models.registry import ALIASES, resolve_alias

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(ref: str) -> tuple[Path, bool, str]:
    """Turn a reference into a local HF directory: (directory, converted_now, display name)."""
    alias = resolve_alias(ref)
    if alias is not None:
        gguf_path, cache_name, display = alias  # one cached copy per file content
        directory, converted = ensure_converted(gguf_path, display, legacy_name=cache_name)
        return directory, converted, display
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf":
        directory, converted = ensure_converted(path)
        return directory, converted, path.stem
    if path.exists():
        return check_hf_dir(path), False, path.resolve().name
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return _from_hub(ref), False, ref
    known = ", ".join(sorted(ALIASES))
    raise ModelLoadError(
        f"model {ref!r} not found: no such directory or file, and it is not a known name "
        f"({known}) or a hub id (owner/name); see `chatforge models list`"
    )


def check_hf_dir(path: Path) -> Path:
    """``path`` when it is a model (or LoRA adapter) directory; else a clear error."""
    if not path.is_dir():
        raise ModelLoadError(
            f"{path} is not a model directory or a .gguf file; "
            "pass a Hugging Face model directory (config.json + weights + tokenizer)"
        )
    meta = ModelMeta.read(path)
    if meta is not None and not meta.complete:
        raise ModelLoadError(f"{path} is an incomplete model directory (a save was interrupted)")
    if (path / "adapter_config.json").exists():
        return path  # a LoRA adapter: its files are checked where it loads (adapter_files.py)
    if not (path / "config.json").exists():
        what = "is empty" if not any(path.iterdir()) else "has no config.json"
        raise ModelLoadError(
            f"model directory {path} {what}; expected a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files)"
        )
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights and not (path / "adapter_config.json").exists() and not weights_in_gguf(meta):
        raise ModelLoadError(f"model directory {path} has no weights (*.safetensors)")
    return path


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = (
        url.hostname or "huggingface.co",
        url.port or (443 if url.scheme == "https" else 80),
    )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the local hub cache
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        raise ModelLoadError(
            f"cannot load {repo_id!r}: it is not in the local Hugging Face cache and {why}; "
            "download it on a connected machine (huggingface-cli download) or pass a local "
            "model directory or .gguf file"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as e:
        raise ModelLoadError(f"could not download {repo_id!r} from the hub: {e}") from e


def adapter_base_dir(directory: Path, base: str) -> tuple[Path, bool]:
    """The model directory of an adapter's base (not itself an adapter), and whether
    resolving it converted a GGUF file now."""
    base_dir, converted, _ = resolve(base)
    if (base_dir / "adapter_config.json").exists():
        raise ModelLoadError(
            f"the base {base} of the LoRA adapter in {directory} is itself a LoRA adapter; "
            "give the model it was trained on"
        )
    return base_dir, converted
