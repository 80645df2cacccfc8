"""Checkpoints that survive anything: atomic writes, checksums, a completion marker.

Layout of ``OUTPUT/checkpoints/step-00000300/``::

    weights.safetensors   trainable parameters (all of them, or the LoRA adapters)
    optimizer.pt          AdamW state (tensors and numbers only: weights_only loading)
    rng-rank0.pt          RNG states of each process (torch, cuda)
    state.json            step, schedule horizon, best validation loss, Python/NumPy RNG
    COMPLETE              sha256 and size of every file above; written last

A checkpoint is written into ``.tmp-step-...`` (each file fsynced), the
``COMPLETE`` marker is written, and only then the folder is renamed into
place and the parent fsynced, so a crash at any moment leaves either the old
set of checkpoints or the new one. On resume a checkpoint without a marker, or
whose files do not match it, is skipped with a message and the next older one
is tried. Pruning checks the checksums too: a corrupt checkpoint never counts
as one of the ``keep`` newest, so the newest *intact* one is never deleted (a
corrupt newer one is left in place, for the user to inspect).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.errors import InputError

CKPT_DIR = "checkpoints"
MARKER = "COMPLETE"
BEST = "best"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (tied weights appear once), contiguous, on CPU."""
    return {
        n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; every one must be present."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    if missing:
        raise InputError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
    for n, p in params.items():  # a clear message instead of copy_'s size-mismatch traceback
        if tuple(state[n].shape) != tuple(p.shape):
            raise InputError(
                f"checkpoint parameter {n} has shape {tuple(state[n].shape)}, the model's is "
                f"{tuple(p.shape)}: the checkpoint is from a model of another size"
            )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def host_rng_state() -> dict:
    """Python and NumPy RNG states as JSON-able values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_host_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def begin(root: Path, name: str) -> Path:
    """A fresh temporary folder for checkpoint ``name`` (main process)."""
    tmp = root / CKPT_DIR / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    """Each process writes its own RNG state into the temporary folder."""
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    _fsync_file(tmp / f"rng-rank{rank}.pt")


def finish(
    root: Path,
    name: str,
    weights: dict[str, torch.Tensor],
    state: dict,
    optimizer: dict | None = None,
) -> Path:
    """Write weights, optimizer and state into the temporary folder, mark it, move it in place."""
    from safetensors.torch import save_file

    tmp = root / CKPT_DIR / f".tmp-{name}"
    save_file(weights, str(tmp / "weights.safetensors"))
    if optimizer is not None:
        torch.save(optimizer, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    files = sorted(p for p in tmp.iterdir() if p.name != MARKER)
    for p in files:
        _fsync_file(p)
    marker = {p.name: {"sha256": _sha256(p), "size": p.stat().st_size} for p in files}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    _fsync_file(tmp / MARKER)
    _fsync_dir(tmp)
    final = root / CKPT_DIR / name
    old = None
    if final.exists():  # replacing "best": move the old one aside first, then drop it
        old = final.with_name(f".old-{name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# Checkpoints already hashed in this process, keyed by folder, with the (name, size,
# mtime) of each file then: pruning verifies at every save, and re-hashing gigabytes of
# unchanged weights each time would cost more than the save itself.
_VERIFIED: dict[Path, tuple] = {}


def _signature(path: Path) -> tuple:
    return tuple(
        sorted((p.name, st.st_size, st.st_mtime_ns) for p in path.iterdir() for st in [p.stat()])
    )


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else why it is not."""
    try:
        sig = _signature(path)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if _VERIFIED.get(path) == sig:
        return None
    why = _verify(path)
    if why is None:
        _VERIFIED[path] = sig
    else:
        _VERIFIED.pop(path, None)
    return why


def _verify(path: Path) -> str | None:
    marker = path / MARKER
    if not marker.exists():
        return "no completion marker (the write was interrupted)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return "its completion marker is unreadable"
    for name, want in files.items():
        p = path / name
        if not p.exists():
            return f"{name} is missing"
        if p.stat().st_size != want["size"] or _sha256(p) != want["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def step_checkpoints(root: Path) -> list[Path]:
    """Step checkpoint folders (complete or not), newest first."""
    d = root / CKPT_DIR
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(found, key=lambda p: p.name, reverse=True)


def candidates(root: Path) -> tuple[Path | None, list[str]]:
    """``(newest intact step checkpoint or None, "name: why" for each newer one rejected)``."""
    rejected = []
    for path in step_checkpoints(root):
        why = verify(path)
        if why is None:
            return path, rejected
        rejected.append(f"{path.name}: {why}")
    return None, rejected


def latest(root: Path, say: Callable[[str], None] = print) -> Path | None:
    """The newest complete, intact checkpoint; broken ones are reported and skipped."""
    found, rejected = candidates(root)
    for r in rejected:
        name, why = r.split(": ", 1)
        say(f"skipping checkpoint {name}: {why}")
    return found


def load(path: Path, rank: int = 0) -> dict:
    """``{"weights", "optimizer", "state", "rng"}`` of a verified checkpoint (safe loading)."""
    from safetensors.torch import load_file

    out: dict = {
        "weights": load_file(str(path / "weights.safetensors")),
        "state": json.loads((path / "state.json").read_text(encoding="utf-8")),
        "optimizer": None,
        "rng": None,
    }
    if (path / "optimizer.pt").exists():
        out["optimizer"] = torch.load(path / "optimizer.pt", weights_only=True)
    rng = path / f"rng-rank{rank}.pt"
    if rng.exists():
        out["rng"] = torch.load(rng, weights_only=True)
    return out


def prune(root: Path, keep: int, say: Callable[[str], None] | None = None) -> list[Path]:
    """Delete step checkpoints older than the ``keep`` newest *intact* ones; return them.

    Only verified checkpoints count towards ``keep``, so a corrupt newest one can
    never push the last good one out. Corrupt or unfinished folders newer than the
    kept ones are left alone (and reported through ``say``); older ones go.
    Stale ``.old-*`` folders from replacing ``best`` are removed too.
    """
    kept, removed = 0, []
    for p in step_checkpoints(root):
        if kept >= keep:
            if (p / MARKER).exists():  # an unfinished one may still be being written
                shutil.rmtree(p, ignore_errors=True)
                _VERIFIED.pop(p, None)
                removed.append(p)
            continue
        why = verify(p)
        if why is None:
            kept += 1
        elif say is not None:
            say(f"[yellow]checkpoint {p.name} is not usable ({why}); kept, not counted")
    d = root / CKPT_DIR
    for p in d.glob(".old-*") if d.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
    return removed
