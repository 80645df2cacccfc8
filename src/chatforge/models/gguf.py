"""Convert a GGUF file into a cached Hugging Face directory: its config and tokenizer.

The weights stay in the GGUF file: the fast path runs its quantised blocks as they
are, and transformers' model is built from its tensors in memory when asked
(:mod:`chatforge.models.gguf_model`, seconds), so the cache holds no fp32 expansion
(538 MB for SmolLM2-135M, where the file is 98 MB). Conversions made by older
versions, which did hold one, give it up the next time they are used
(:func:`ensure_converted`).

The cache is keyed by the file's content (SHA-256, remembered per version of the
file by :mod:`chatforge.models.gguf_file`, which reads GGUF files), so the same GGUF
reached by an alias, by its path or as a copy shares one conversion. The conversion
is atomic: it is written to a temporary directory (``.tmp-<name>-<pid>-<ns>``), fsynced and
renamed, and its ``chatforge.json`` marks it complete, so an interrupted conversion
is never mistaken for a model; temp dirs whose process is gone are removed by the
next conversion or ``chatforge models list``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from chatforge.errors import ModelLoadError
from chatforge.models.gguf_file import (
    check_gguf,
    file_digest,
    gguf_params,
    short_error,
    source_gguf,
)
from chatforge.models.meta import ModelMeta, params_from_safetensors
from chatforge.noise import quiet_transformers
from chatforge.paths import models_cache_dir

log = logging.getLogger(__name__)


def legacy_cache_key(path: Path) -> str:
    """The directory name older versions used (path, size, mtime): read, never written."""
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{h[:10]}"


# -- the cache ----------------------------------------------------------------


def is_complete(directory: Path) -> bool:
    """A finished conversion (or model save): complete meta and a config."""
    meta = ModelMeta.read(directory)
    return bool(meta and meta.complete and (directory / "config.json").exists())


def digest_of(directory: Path) -> str | None:
    """The GGUF SHA-256 a cache directory was converted from (None for old entries)."""
    meta = ModelMeta.read(directory)
    value = meta.extra.get("sha256") if meta else None
    return value if isinstance(value, str) else None


def cache_entries(root: Path | None = None) -> list[Path]:
    """Complete conversions in the cache, by name (temp and hidden entries skipped)."""
    root = root or models_cache_dir()
    if not root.is_dir():
        return []
    return [
        d
        for d in sorted(root.iterdir())
        if not d.name.startswith(".") and d.is_dir() and not d.is_symlink() and is_complete(d)
    ]


def find_converted(digest: str) -> Path | None:
    """The complete cache directory converted from the file with this SHA-256."""
    for d in cache_entries():
        if digest_of(d) == digest:
            return d
    return None


def _target_name(path: Path, digest: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "model"
    return f"{stem}-{digest[:12]}"


def adopt_legacy(path: Path, digest: str, legacy_name: str | None) -> Path | None:
    """Reuse a conversion made under an older cache key, recording its hash in place.

    The old per-path key (path, size, mtime) names exactly this version of the file;
    an alias's fixed name is trusted when it was converted from this path after the
    file was last written. Nothing is renamed (a running chatforge may be using it).
    """
    root = models_cache_dir()
    candidates = [root / legacy_cache_key(path)]
    if legacy_name:
        candidates.append(root / legacy_name)
    for d in candidates:
        meta = ModelMeta.read(d)
        if not is_complete(d) or meta is None or digest_of(d) not in (None, digest):
            continue
        if d.name == legacy_name and not _converted_from(d, meta, path):
            continue
        meta.extra = {**meta.extra, "sha256": digest, "gguf_bytes": path.stat().st_size}
        with contextlib.suppress(OSError):
            meta.write(d)
        return d
    return None


def _converted_from(directory: Path, meta: ModelMeta, path: Path) -> bool:
    """Whether ``directory`` was converted from ``path`` as it is now (not an older file)."""
    try:
        same = meta.source is not None and Path(meta.source).resolve() == path.resolve()
        newer = (directory / "config.json").stat().st_mtime_ns >= path.stat().st_mtime_ns
    except OSError:
        return False
    return same and newer


# -- interrupted conversions ----------------------------------------------------

TEMP_PREFIX = ".tmp-"
STALE_SECONDS = 3600  # a temp dir untouched this long is stale even if its pid lives


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (owned by someone else) or cannot tell: keep it
    return True


def _temp_pid(name: str) -> int | None:
    """The owning pid in ``.tmp-<name>-<pid>-<ns>``, None when the name has none."""
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _newest_mtime(directory: Path) -> float:
    newest = directory.stat().st_mtime
    for p in directory.rglob("*"):
        with contextlib.suppress(OSError):
            newest = max(newest, p.stat().st_mtime)
    return newest


def is_stale_temp(directory: Path, now: float | None = None) -> bool:
    """A temp dir nobody is writing: its owning pid is gone, or untouched for an hour."""
    pid = _temp_pid(directory.name)
    if pid is not None and pid != os.getpid() and not _pid_alive(pid):
        return True
    try:
        age = (now or time.time()) - _newest_mtime(directory)
    except OSError:
        return False
    return age > STALE_SECONDS


def clean_stale_temp_dirs(root: Path | None = None) -> list[Path]:
    """Remove the temp dirs left by interrupted conversions (or removals); returns them."""
    root = root or models_cache_dir()
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in root.glob(f"{TEMP_PREFIX}*"):
        if d.is_dir() and not d.is_symlink() and is_stale_temp(d):
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed


def temp_dir_for(target: Path) -> Path:
    """A fresh temp path beside ``target`` that names this process as its owner."""
    return target.parent / f"{TEMP_PREFIX}{target.name}-{os.getpid()}-{time.monotonic_ns()}"


def _fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# -- conversion ---------------------------------------------------------------


def ensure_converted(
    path: Path, display_name: str | None = None, legacy_name: str | None = None
) -> tuple[Path, bool]:
    """(cached HF directory for the GGUF file, whether this call converted it)."""
    path = Path(path).expanduser()
    check_gguf(path, parse=False)
    digest = file_digest(path)
    found = find_converted(digest) or adopt_legacy(path, digest, legacy_name)
    if found is not None:
        _keep_up(found, path)
        return found, False
    # Fail on a truncated or corrupt file before converting it (one parse: it counts too).
    n_params = gguf_params(check_gguf(path))
    target = models_cache_dir() / _target_name(path, digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(target.parent)
    tmp = temp_dir_for(target)
    t0 = time.perf_counter()
    extra = {"sha256": digest, "gguf_bytes": path.stat().st_size, "n_params": n_params}
    try:  # KeyboardInterrupt included: the finally removes the partial conversion
        _convert_into(path, tmp, display_name or path.stem, extra)
        _fsync_tree(tmp)
        if target.exists():  # an incomplete leftover (or a concurrent conversion finished)
            if is_complete(target):
                return target, False
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1fs into %s", path, time.perf_counter() - t0, target)
    return target, True


def _convert_into(path: Path, out: Path, display_name: str, extra: dict | None = None) -> None:
    """Write the config, generation config and tokenizer of the GGUF file ``path`` into
    ``out``; its weights stay in the file (``extra["weights"] = "gguf"``)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out.mkdir(parents=True)
    extra = {**(extra or {}), WEIGHTS_KEY: IN_GGUF}
    # The meta file goes first with complete=False: a crash leaves a directory that
    # is recognisably partial.
    ModelMeta(
        prompt_format=None, name=display_name, source=str(path), complete=False, extra=extra
    ).write(out)
    print(
        f"Reading {path.name}'s settings and tokenizer once into {out.parent} "
        "(a few seconds; the weights stay in the file)...",
        file=sys.stderr,
        flush=True,
    )
    try:
        # The GGUF reader draws its own tqdm bars; keep them off the user's terminal.
        with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf's reader raises many kinds of errors on bad files
        raise ModelLoadError(f"could not read GGUF file {path}: {short_error(e)}") from e
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if model_class is None:
        raise ModelLoadError(
            f"{path} holds a {config.model_type!r} model, which transformers cannot run "
            "as a causal language model"
        )
    _gpt2_settings(config)
    # What transformers' save_pretrained of the dequantised model wrote (older versions).
    config.architectures = [model_class]
    config.dtype = torch.float32
    with contextlib.redirect_stderr(io.StringIO()):
        config.save_pretrained(out)
        GenerationConfig.from_model_config(config).save_pretrained(out)
        tok.save_pretrained(out)
    fmt = "chat_template" if getattr(tok, "chat_template", None) else None
    ModelMeta(
        prompt_format=fmt, name=display_name, source=str(path), complete=True, extra=extra
    ).write(out)


def _gpt2_settings(config: Any) -> None:
    """transformers' GGUF reader files a GPT-2's context length and feed-forward width
    under ``n_ctx`` and ``feed_forward_length``, which its GPT-2 does not read (it would
    build 1024 positions for a 128-position file, and fail to load it): put them where
    it does."""
    if config.model_type != "gpt2":
        return
    if isinstance(getattr(config, "n_ctx", None), int):
        config.n_positions = config.n_ctx
    if isinstance(getattr(config, "feed_forward_length", None), int):
        config.n_inner = config.feed_forward_length


# -- weights kept in the GGUF file ----------------------------------------------

WEIGHTS_KEY = "weights"  # chatforge.json extra: where the weights are
IN_GGUF = "gguf"  # ... in the source GGUF file, not in the directory


def weights_in_gguf(meta: ModelMeta | None) -> bool:
    """Whether a conversion keeps its weights in its GGUF file (no copy in the directory)."""
    return bool(meta and (meta.extra or {}).get(WEIGHTS_KEY) == IN_GGUF)


def weights_source(directory: Path, meta: ModelMeta | None = None) -> Path | None:
    """The GGUF file holding ``directory``'s weights; None where the directory holds
    its own. Fails clearly when the file has moved or changed since the conversion."""
    meta = meta if meta is not None else ModelMeta.read(directory)
    if not weights_in_gguf(meta):
        return None
    source = source_gguf(meta)
    if source is None:
        raise ModelLoadError(
            f"the weights of {directory} are read from {meta.source}, which is gone or has "
            "changed since it was converted; load the .gguf file by its path again (its "
            "settings are read once more, in seconds)"
        )
    return source


def _keep_up(directory: Path, path: Path) -> None:
    """A found conversion of ``path`` (same content): record ``path`` as its source where
    the recorded one is gone, and give up an older version's fp32 copy of the weights."""
    meta = ModelMeta.read(directory)
    if meta is None:
        return
    changed = False
    if source_gguf(meta) is None:  # moved or deleted; this copy has the same bytes
        meta.source, changed = str(path.resolve()), True
    weight_files = [
        *directory.glob("model*.safetensors"),
        *directory.glob("model.safetensors.index.json"),
    ]
    if not weights_in_gguf(meta) and weight_files:
        n = params_from_safetensors(directory)
        meta.extra = {**meta.extra, WEIGHTS_KEY: IN_GGUF, "n_params": n}
        changed = True
    if changed:
        with contextlib.suppress(OSError):
            meta.write(directory)  # first: the weights are read from the file from now on
            for f in weight_files:  # an older version's fp32 copy
                f.unlink(missing_ok=True)
                log.info("removed %s: the weights are read from %s", f, meta.source)
