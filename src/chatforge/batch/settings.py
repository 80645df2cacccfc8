"""The settings a batch output was made with, so a rerun resumes only into its own.

Every row records them: ``params`` (the generation settings as they took
effect) and ``settings``, the rest of what decides a reply::

    "settings": {"model": "smollm2", "api_base": null, "template": "Q: {q}",
                 "system": null, "n": 1}

Together they are the row's *fingerprint*. Opening an output to resume it
collects the distinct fingerprints its rows hold (:class:`Fingerprints`); a run
whose own fingerprint differs from one of them is refused with one line naming
what differs (:meth:`Fingerprints.conflict`), before anything in the file is
touched, unless the caller forces it (``--force-resume``). Rows written before
rows had ``settings`` have no fingerprint and never block a resume.

Only settings present on both sides are compared, so a generation setting that a
later chatforge adds does not turn every older output into a mismatch. What does
not change a reply (batch size, threads, concurrency, progress) is not recorded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETTINGS_KEYS = ("model", "api_base", "template", "system", "format", "n")
"""The keys of a row's ``settings`` (``api_base`` is ``None`` for a local model;
``format`` is the prompt format asked for, ``None`` for the model's own)."""


def model_key(ref: str | None) -> str | None:
    """How a model reference is recorded: a local path made absolute (``./m`` and
    ``/home/me/m`` are one model), anything else (an alias, a named model, a hub id,
    an endpoint's model name) as given."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    if ref.startswith(("/", ".", "~")) or path.exists():
        return os.path.abspath(path)
    return ref


def run_settings(
    model: str | None,
    template: str | None,
    system: str | None,
    n: int,
    api_base: str | None = None,
    fmt: str | None = None,
) -> dict[str, Any]:
    """A row's ``settings`` (``model`` as :func:`model_key` records it)."""
    return {
        "model": model_key(model) if api_base is None else model,
        "api_base": api_base.rstrip("/") if api_base else None,
        "template": template,
        "system": system or None,
        "format": fmt,
        "n": n,
    }


def fingerprint(settings: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """One flat mapping of everything that decides a reply, as JSON holds it (tuples
    are lists, mapping keys are text), so a value read back compares equal."""
    flat = {**dict(params), **{k: settings.get(k) for k in SETTINGS_KEYS}}
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


@dataclass
class Fingerprints:
    """The distinct fingerprints of an output's rows, in file order, with row counts."""

    seen: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)

    def add(self, settings: Any, params: Any) -> None:
        """Count one row, given its ``settings`` and ``params`` (ignored unless a mapping)."""
        if not isinstance(settings, Mapping):
            return  # written before rows had settings: nothing to compare
        fp = fingerprint(settings, params if isinstance(params, Mapping) else {})
        key = json.dumps(fp, sort_keys=True)
        first, count = self.seen.get(key, (fp, 0))
        self.seen[key] = (first, count + 1)

    def conflict(self, name: str, mine: Mapping[str, Any]) -> str | None:
        """The one-line refusal when rows were made with other settings than ``mine``
        (a fingerprint; a ``None`` model is not compared), else ``None``."""
        for theirs, count in self.seen.values():
            diff = [
                k
                for k in sorted(set(theirs) & set(mine), key=_order)
                if theirs[k] != mine[k] and not (k == "model" and mine[k] is None)
            ]
            if diff:
                rows = f"{count} row{'s' if count != 1 else ''}"
                return (
                    f"{name} holds {rows} made with {_describe(theirs, diff)}; this run has "
                    f"{_describe(mine, diff)}: use another --output, or --force-resume to "
                    "add to it"
                )
        return None


def _order(key: str) -> tuple[int, str]:
    """Settings first (model, template, ...), then generation settings by name."""
    return (SETTINGS_KEYS.index(key), "") if key in SETTINGS_KEYS else (len(SETTINGS_KEYS), key)


def _describe(fp: Mapping[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={_show(fp[k])}" for k in keys)


def _show(value: Any, limit: int = 80) -> str:
    """A value on one line: simple text bare, other text quoted, the rest as JSON;
    a long one keeps its start and its end (where two paths tend to differ)."""
    if value is None:
        return "none"
    if isinstance(value, str) and value.isprintable() and value and " " not in value:
        text = value
    else:
        text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return text[:half] + "..." + text[-half:]
