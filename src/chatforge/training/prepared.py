"""Prepared training rows, cached by content; the data fingerprint a checkpoint records.

Turning chitchat into SmolLM2 rows (chat template per conversation, windows of
turns, packing) took ~2 minutes on every run. The packed rows depend only on

* the bytes of the data sources (:func:`fingerprint`: a SHA-256 over each source's
  files, so a moved or renamed copy is the same data, an edited one is not),
* how they are read and cut (data kind, ``--on-error``, ``--valid``/``--valid-split``,
  ``--train-on``),
* the tokenizer (:func:`tokenizer_identity`: its serialised vocabulary and merges,
  special and added tokens, chat template), the prompt format and the context,
* whether packing is on (and honoured by the model),

so they are kept under ``CACHE/prepared/<key>/`` beside the converted models
(``chatforge.paths.cache_dir``) and read back in about a second. The cache holds
token ids only, as ``.npy`` arrays loaded with ``allow_pickle=False``; a damaged
entry is ignored and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from chatforge.paths import cache_dir
from chatforge.training.examples import Row

VERSION = 1  # bump when the preparation (examples.py) changes what it produces
_CHUNK = 1 << 20


def prepared_dir() -> Path:
    return cache_dir() / "prepared"


def _source_files(source: str) -> list[tuple[str, Path]]:
    """``(name, path)`` of each file a source reads, in a stable order."""
    from chatforge.training.data import CHITCHAT, chitchat_path

    if source == CHITCHAT:
        return [(CHITCHAT, chitchat_path())]
    path = Path(source).expanduser()
    if path.is_dir():
        return [(str(p.relative_to(path)), p) for p in sorted(path.rglob("*.txt"))]
    return [(path.name, path)] if path.is_file() else []


def fingerprint(sources: Iterable[str], kind: str | None = None) -> str:
    """SHA-256 over the bytes of ``sources`` (in order) and the data kind override.

    File names do not count (the same file elsewhere is the same data); for a
    folder the names relative to it do, since they order its files. A source that
    does not exist hashes as its name (reading it fails later with a clear message).
    """
    h = hashlib.sha256(f"kind={kind}\n".encode())
    for src in sources:
        files = _source_files(str(src))
        h.update(f"source {len(files)}\n".encode())
        if not files:
            h.update(f"missing {src}\n".encode())
        for rel, path in files:
            h.update(f"{rel if Path(str(src)).expanduser().is_dir() else ''}\n".encode())
            with open(path, "rb") as f:
                while block := f.read(_CHUNK):
                    h.update(block)
    return h.hexdigest()


def tokenizer_identity(tok: Any) -> str:
    """A hash of everything in a tokenizer that changes the ids it gives."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow (Python) tokenizer: its vocabulary
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    extra = {
        "len": len(tok),
        "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "added": sorted(str(t) for t in tok.get_added_vocab()),
        "template": getattr(tok, "chat_template", None),
        "bos": getattr(tok, "add_bos_token", None),
        "eos": getattr(tok, "add_eos_token", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(settings: dict) -> str:
    """The cache key of the prepared rows for ``settings`` (JSON-able values)."""
    blob = json.dumps({"version": VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def seen(settings: dict) -> bool:
    """True when data with these settings was prepared before (for some tokenizer): the
    trainer then loads the model before reading the data, expecting a cache hit."""
    return (prepared_dir() / f"seen-{cache_key(settings)}").exists()


def mark_seen(settings: dict) -> None:
    with contextlib.suppress(OSError):
        prepared_dir().mkdir(parents=True, exist_ok=True)
        (prepared_dir() / f"seen-{cache_key(settings)}").touch()


# -- storage -------------------------------------------------------------------------


def _flat(rows: list[Row]) -> dict[str, np.ndarray]:
    has_types = bool(rows) and rows[0].types is not None
    return {
        "ids": np.fromiter((t for r in rows for t in r.ids), dtype=np.int64),
        "targets": np.fromiter((t for r in rows for t in r.targets), dtype=np.int64),
        "types": np.fromiter((t for r in rows for t in r.types), dtype=np.int8)  # type: ignore[union-attr]
        if has_types
        else np.zeros(0, dtype=np.int8),
        "row_len": np.array([len(r) for r in rows], dtype=np.int64),
        "n_ex": np.array([len(r.lengths) for r in rows], dtype=np.int64),
        "ex_len": np.fromiter((n for r in rows for n in r.lengths), dtype=np.int64),
        "has_types": np.array([has_types]),
    }


def _rows(a: dict[str, np.ndarray]) -> list[Row]:
    ids, targets = a["ids"].tolist(), a["targets"].tolist()
    types = a["types"].tolist() if bool(a["has_types"][0]) else None
    ex_len = a["ex_len"].tolist()
    rows, off, e = [], 0, 0
    for n, k in zip(a["row_len"].tolist(), a["n_ex"].tolist(), strict=True):
        rows.append(
            Row(
                ids[off : off + n],
                types[off : off + n] if types is not None else None,
                targets[off : off + n],
                ex_len[e : e + k],
            )
        )
        off, e = off + n, e + k
    return rows


def load(key: str) -> tuple[list[Row], list[Row], dict] | None:
    """``(rows, valid rows, info)`` of a cached preparation, or None (missing or damaged)."""
    d = prepared_dir() / key
    try:
        info = json.loads((d / "info.json").read_text(encoding="utf-8"))
        parts = []
        for name in ("train", "valid"):
            with np.load(d / f"{name}.npz", allow_pickle=False) as z:
                parts.append(_rows({k: z[k] for k in z.files}))
    except (OSError, ValueError, KeyError):
        return None
    return parts[0], parts[1], info


def save(key: str, rows: list[Row], vrows: list[Row], info: dict) -> None:
    """Store a preparation (atomically: a temporary folder renamed into place).
    Failures are ignored: it is a cache."""
    root = prepared_dir()
    tmp = root / f".tmp-{key}-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        np.savez(tmp / "train.npz", **_flat(rows))
        np.savez(tmp / "valid.npz", **_flat(vrows))
        (tmp / "info.json").write_text(json.dumps(info), encoding="utf-8")
        final = root / key
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                shutil.rmtree(tmp)
