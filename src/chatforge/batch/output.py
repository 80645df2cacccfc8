"""Append-only result files (``.jsonl`` or ``.csv``) that survive a crash and resume.

A ``.txt`` output (``generate prompts.txt -o out.txt``, as a script that continues
each line of a file would write it) is a view: the rows are kept beside it in
``out.txt.rows.jsonl`` (resume, errors and settings live there), and ``out.txt`` is
written from them, whole and atomically, when the writer closes: each prompt followed
by its continuation, entries separated by a blank line (see :func:`write_text_view`).

Rows are written whole: each call to :meth:`RowWriter.write` serialises its
rows, hands them to the OS in a single ``write``, then flushes and fsyncs. A
crash or SIGKILL can therefore tear at most the last line being written; every
row before it is finished and stays.

Opening an existing file reads back the resume keys it already holds (each
row's ``key``, see :attr:`~chatforge.batch.records.Record.key`), so a rerun
skips them. Rows from files written before rows had a ``key`` are matched by
their bare ``id``, as they were then. A torn last row (no final newline, or
one that does not parse) is cut off, and only it: rows in the middle that do
not parse are left alone (they are someone's data) and merely ignored.

It also reads back the settings the rows were made with (their fingerprints,
see :mod:`~chatforge.batch.settings`): given this run's fingerprint, a file
made with other settings is refused before anything in it changes (not even
a torn last row is cut), unless ``force_resume``.

A write that fails (a full disk) is undone, so no torn row is left, and
becomes a one-line :class:`~chatforge.errors.ChatforgeError` saying that the
rows written so far are kept and a rerun resumes.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chatforge.batch.records import id_key
from chatforge.batch.settings import Fingerprints
from chatforge.errors import ChatforgeError
from chatforge.fsutil import atomic_write

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".txt")
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
    "key",
    "settings",
)
"""The CSV header; nested values (lists, dicts) are stored as JSON text in their cell."""

LEGACY_CSV_COLUMNS = CSV_COLUMNS[:-2]
"""The header before rows had a ``key``; such files are still resumed (by ``id``)."""

KEYED_CSV_COLUMNS = CSV_COLUMNS[:-1]
"""The header before rows had ``settings``; such files are still resumed (by ``key``),
and rows appended to them keep that header (so they record no settings)."""

_KNOWN_HEADERS = (CSV_COLUMNS, KEYED_CSV_COLUMNS, LEGACY_CSV_COLUMNS)


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


def rows_file(path: Path) -> Path:
    """Where an output's rows are kept: the file itself, or beside a ``.txt`` view."""
    if path.suffix.lower() == ".txt":
        return path.with_name(path.name + ".rows.jsonl")
    return path


def write_text_view(rows_path: Path, path: Path) -> int:
    """Write ``path`` from the rows in ``rows_path``: for each record (in id order) that
    has an output, its prompt followed by each output (a text-format model's output
    continues the prompt; another model's reply goes on the next line), entries
    separated by a blank line. Returns the entries written."""
    rows: list[dict] = []
    try:
        with open(rows_path, "rb") as f:
            rows = [r for r in map(_parse_json_row, f) if r is not None]
    except FileNotFoundError:
        pass
    done = [r for r in rows if r.get("error") is None and r.get("output") is not None]
    if all(isinstance(r.get("id"), int) for r in done):
        done.sort(key=lambda r: r["id"])
    entries: list[str] = []
    for r in done:
        model = r.get("model") if isinstance(r.get("model"), dict) else {}
        joiner = "" if model.get("prompt_format") == "text" else "\n"
        outputs = r.get("outputs") if isinstance(r.get("outputs"), list) else [r["output"]]
        entries += [f"{r.get('prompt') or ''}{joiner}{out}".strip("\n") for out in outputs]
    atomic_write(path, "".join(e + "\n\n" for e in entries).rstrip("\n") + "\n" if entries else "")
    return len(entries)


@dataclass
class Existing:
    """What an output file already held when it was opened."""

    ids: set[str] = field(default_factory=set)  # resume keys of finished rows (Record.key)
    legacy_ids: set[str] = field(default_factory=set)  # id_key of finished rows without a key
    rows: int = 0  # finished rows, including those without an id
    torn_bytes: int = 0  # bytes of a torn last row that were cut off
    bad_rows: int = 0  # unreadable rows in the middle (kept, ignored)
    fingerprints: Fingerprints = field(default_factory=Fingerprints)  # settings of the rows

    def has(self, key: str, legacy_key: str) -> bool:
        """Whether the record with these keys (Record.key, Record.legacy_key) is done."""
        return key in self.ids or legacy_key in self.legacy_ids


class RowWriter:
    """Appends result rows to a ``.jsonl`` or ``.csv`` file; see the module docstring.

    ``fingerprint`` (see :func:`~chatforge.batch.settings.fingerprint`) is this run's:
    rows already in the file that were made with other settings make the writer
    refuse the file, unless ``force_resume``.
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any] | None = None,
        force_resume: bool = False,
    ) -> None:
        self.path = check_output(path)  # what the user named (a .txt view, or the rows)
        self.rows_path = rows_file(self.path)  # where the rows are appended
        self.csv = self.path.suffix.lower() == ".csv"
        self.columns = CSV_COLUMNS  # an old file keeps its own header (see _scan_csv)
        try:
            self._f: IO[bytes] = open(self.rows_path, "a+b")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise ChatforgeError(f"cannot write {self.rows_path}: {e.strerror}") from e
        self._lock()
        self.written = 0  # rows appended by this writer
        try:
            self.existing, repair = self._scan_csv() if self.csv else self._scan_jsonl()
            if fingerprint is not None:
                self.check_fingerprint(fingerprint, force_resume)
            repair()  # only now: a refused file is left exactly as it was
            if self.csv and os.fstat(self._f.fileno()).st_size == 0:
                self._write_bytes(self._csv_line(list(CSV_COLUMNS)))
        except BaseException:
            self._f.close()
            raise

    def check_fingerprint(self, fingerprint: dict[str, Any], force_resume: bool = False) -> None:
        """Raise a one-line :class:`ChatforgeError` when the file holds rows made with
        other settings than ``fingerprint`` (unless ``force_resume``)."""
        if force_resume:
            return
        message = self.existing.fingerprints.conflict(str(self.path), fingerprint)
        if message is not None:
            raise ChatforgeError(message)

    # -- writing -----------------------------------------------------------------

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append ``rows`` in one write, then flush and fsync."""
        if not rows:
            return
        if self.csv:
            cols = self.columns
            data = b"".join(self._csv_line([_cell(r.get(c)) for c in cols]) for r in rows)
        else:
            data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)
        self._write_bytes(data)
        self.written += len(rows)

    def close(self) -> None:
        """Close the rows; a ``.txt`` output is then written from them."""
        closed = self._f.closed
        self._f.close()
        if not closed and self.rows_path != self.path:
            write_text_view(self.rows_path, self.path)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_bytes(self, data: bytes) -> None:
        """Append ``data`` and fsync; on failure, cut what got written and say so in one line.

        Written with ``os.write`` on the descriptor, not through the buffered file:
        a buffer left holding the failed bytes would be flushed again, and fail
        again, when the file is closed.
        """
        fd = self._f.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, start)  # no torn row left behind (a rerun would cut it anyway)
            except OSError:
                pass
            raise ChatforgeError(self._write_failure(e)) from e

    def _write_failure(self, e: OSError) -> str:
        kept = getattr(self, "existing", Existing()).rows + getattr(self, "written", 0)
        why = "the disk is full" if e.errno in _DISK_FULL else e.strerror
        return (
            f"cannot write {self.path}: {why}; the {kept} rows written so far are kept, "
            "free some space and rerun the same command to resume"
        )

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

    # The scans only read; each returns what it found and a function that makes the
    # repairs (cutting a torn last row), called once the file is accepted.

    def _scan_jsonl(self) -> tuple[Existing, Callable[[], None]]:
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
                if isinstance(row.get("key"), str):
                    existing.ids.add(row["key"])
                elif "id" in row:
                    existing.legacy_ids.add(id_key(row["id"]))
                existing.fingerprints.add(row.get("settings"), row.get("params"))
            if last:
                keep = len(data)
                break
            pos = keep = end + 1

        def repair() -> None:
            self._cut(keep, existing, len(data))
            if keep > 0 and not data[:keep].endswith(b"\n"):
                # A whole row that lost only its newline: keep it, end the line.
                self._write_bytes(b"\n")

        return existing, repair

    def _scan_csv(self) -> tuple[Existing, Callable[[], None]]:
        data = self._read_all()
        existing = Existing()
        if not data:
            return existing, lambda: None
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
        if tuple(header) in _KNOWN_HEADERS:
            self.columns = tuple(header)
        else:
            if consumed == len(lines) and not data.endswith(b"\n"):
                # Our own header, torn: start over (the header is written after repair).
                return existing, lambda: self._cut(0, existing, len(data))
            raise ChatforgeError(
                f"{self.path} is a CSV file with other columns than chatforge writes; "
                "pick a new output file"
            )
        col = {name: i for i, name in enumerate(self.columns)}
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
            whole = len(row) == len(self.columns)
            if at_end and (not whole or not data.endswith(b"\n")):
                break  # torn last row
            keep = offsets[consumed - 1]
            if not whole:
                existing.bad_rows += 1
                continue
            existing.rows += 1
            if "key" in col and row[col["key"]] != "":
                existing.ids.add(row[col["key"]])
            else:
                existing.legacy_ids.add(row[col["id"]])
            if "settings" in col:
                existing.fingerprints.add(
                    _json_cell(row[col["settings"]]), _json_cell(row[col["params"]])
                )
        return existing, lambda: self._cut(keep, existing, len(data))


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space, or quota


def _json_cell(text: str) -> Any:
    """A CSV cell holding JSON (``settings``, ``params``), or ``None``."""
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


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
