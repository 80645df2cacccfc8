"""Append-only result files (``.jsonl`` or ``.csv``) that survive a crash and resume.

Rows are written whole: each call to :meth:`RowWriter.write` serialises its
rows, hands them to the OS in a single ``write``, then flushes and fsyncs. A
crash or SIGKILL can therefore tear at most the last line being written; every
row before it is finished and stays.

Opening an existing file reads back the ids it already holds, so a rerun skips
them. A torn last row (no final newline, or one that does not parse) is cut
off, and only it: rows in the middle that do not parse are left alone (they
are someone's data) and merely ignored.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chatforge.batch.records import id_key
from chatforge.errors import ChatforgeError

OUTPUT_SUFFIXES = (".jsonl", ".csv")
"""Output types :class:`RowWriter` writes (by extension, case-insensitive)."""

CSV_COLUMNS = (
    "id",
    "source",
    "prompt",
    "output",
    "outputs",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "seconds",
    "error",
    "params",
    "model",
)
"""The CSV header; nested values (lists, dicts) are stored as JSON text in their cell."""


def check_output(path: str | Path) -> Path:
    """The output as a Path, after checking its extension and that it can be created."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ChatforgeError(
            f"output file {path} has an unknown extension {suffix or '(none)'!r}; "
            f"use one of: {', '.join(OUTPUT_SUFFIXES)}"
        )
    if p.is_dir():
        raise ChatforgeError(f"output file {path} is a directory; give a file name")
    if not p.parent.exists():
        raise ChatforgeError(f"cannot write {path}: directory {p.parent} does not exist")
    return p


@dataclass
class Existing:
    """What an output file already held when it was opened."""

    ids: set[str] = field(default_factory=set)  # id keys of finished rows (see id_key)
    rows: int = 0  # finished rows, including those without an id
    torn_bytes: int = 0  # bytes of a torn last row that were cut off
    bad_rows: int = 0  # unreadable rows in the middle (kept, ignored)


class RowWriter:
    """Appends result rows to a ``.jsonl`` or ``.csv`` file; see the module docstring."""

    def __init__(self, path: str | Path) -> None:
        self.path = check_output(path)
        self.csv = self.path.suffix.lower() == ".csv"
        try:
            self._f: IO[bytes] = open(self.path, "a+b")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise ChatforgeError(f"cannot write {self.path}: {e.strerror}") from e
        self._lock()
        self.existing = self._scan_csv() if self.csv else self._scan_jsonl()
        if self.csv and self._f.tell() == 0:
            self._write_bytes(self._csv_line(list(CSV_COLUMNS)))

    # -- writing -----------------------------------------------------------------

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append ``rows`` in one write, then flush and fsync."""
        if not rows:
            return
        if self.csv:
            data = b"".join(self._csv_line([_cell(r.get(c)) for c in CSV_COLUMNS]) for r in rows)
        else:
            data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)
        self._write_bytes(data)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_bytes(self, data: bytes) -> None:
        self._f.write(data)
        self._f.flush()
        os.fsync(self._f.fileno())

    @staticmethod
    def _csv_line(cells: list[str]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        return buf.getvalue().encode("utf-8")

    def _lock(self) -> None:
        """Refuse a second run appending to the same file (it would duplicate rows)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks
            return
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._f.close()
            raise ChatforgeError(
                f"{self.path} is being written by another run; wait for it or pick another output"
            ) from e

    # -- reading back ------------------------------------------------------------

    def _read_all(self) -> bytes:
        self._f.seek(0)
        data = self._f.read()
        self._f.seek(0, os.SEEK_END)
        return data

    def _cut(self, keep: int, existing: Existing, size: int) -> None:
        """Truncate to ``keep`` bytes (the end of the last finished row)."""
        if keep < size:
            existing.torn_bytes = size - keep
            self._f.truncate(keep)
            self._f.flush()
            os.fsync(self._f.fileno())
        self._f.seek(0, os.SEEK_END)

    def _scan_jsonl(self) -> Existing:
        data = self._read_all()
        existing = Existing()
        keep = 0  # end offset of the last finished row
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            last = end == -1
            line = data[pos:] if last else data[pos:end]
            row = _parse_json_row(line)
            if line.strip() and row is None:
                if last:
                    break  # a torn last line: cut below
                existing.bad_rows += 1
            elif row is not None:
                existing.rows += 1
                if "id" in row:
                    existing.ids.add(id_key(row["id"]))
            if last:
                keep = len(data)
                break
            pos = keep = end + 1
        self._cut(keep, existing, len(data))
        if keep > 0 and not data[:keep].endswith(b"\n"):
            # A whole row that lost only its newline: keep it, end the line.
            self._write_bytes(b"\n")
        return existing

    def _scan_csv(self) -> Existing:
        data = self._read_all()
        existing = Existing()
        if not data:
            return existing
        offsets: list[int] = []  # byte offset where each line ends
        lines: list[str] = []
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            end = len(data) if end == -1 else end + 1
            lines.append(data[pos:end].decode("utf-8", errors="replace"))
            offsets.append(end)
            pos = end
        consumed = 0

        def feed():
            nonlocal consumed
            for line in lines:
                consumed += 1
                yield line

        reader = csv.reader(feed())
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            header = []
        if tuple(header) != CSV_COLUMNS:
            if consumed == len(lines) and not data.endswith(b"\n"):
                header = []  # our own header, torn: start over
                self._cut(0, existing, len(data))
                self._write_bytes(self._csv_line(list(CSV_COLUMNS)))
                return existing
            self._f.close()
            raise ChatforgeError(
                f"{self.path} is a CSV file with other columns than chatforge writes; "
                "pick a new output file"
            )
        keep = offsets[consumed - 1]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                if consumed >= len(lines):
                    break  # torn last row (e.g. an unterminated quote)
                existing.bad_rows += 1
                keep = offsets[consumed - 1]
                continue
            at_end = consumed >= len(lines)
            whole = len(row) == len(CSV_COLUMNS)
            if at_end and (not whole or not data.endswith(b"\n")):
                break  # torn last row
            keep = offsets[consumed - 1]
            if not whole:
                existing.bad_rows += 1
                continue
            existing.rows += 1
            existing.ids.add(row[0])
        self._cut(keep, existing, len(data))
        return existing


def _parse_json_row(line: bytes) -> dict | None:
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(round(value, 4))
    if isinstance(value, int | bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)
