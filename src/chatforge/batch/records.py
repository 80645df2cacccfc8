"""Input records for batch generation: ``.txt``, ``.jsonl`` and ``.csv`` files.

Each reader yields one :class:`Record` per record in file order. A record that
cannot be read (a malformed JSON line, a CSV row with the wrong number of
fields, a quote that is never closed, a line that is not UTF-8) is still
yielded, with ``error`` set and its ``file:line`` in the message, so the run
can write an error row for it and go on instead of losing the whole file to
one bad line. (A CSV quote that is never closed would otherwise take every
line after it into one field; the lines after it are read as records.)

Record ids: the record's own ``id`` field when it has one, else its index (the
0-based position among the file's records; blank lines are not records). The
id is what makes a rerun resumable, so it must be stable across runs of the
same input, and unique: the resume key (:attr:`Record.key`) of a record without
an id is ``"#<index>"``, and an explicit id that itself starts with ``#`` gets
one more ``#`` in its key, so record 0 without an id and another record with
``"id": 0`` (or ``"id": "#0"``) can never be taken for each other.
"""

from __future__ import annotations

import csv
import json
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError

INPUT_SUFFIXES = (".txt", ".jsonl", ".csv")
"""File types :func:`read_records` understands (by extension, case-insensitive)."""


@dataclass
class Record:
    """One input record: its fields, or why it could not be read."""

    index: int  # 0-based position among the input's records
    id: Any  # the record's "id" field if it has one, else ``index``
    fields: dict[str, Any]  # values a template can use; empty when ``error`` is set
    source: str  # "file:line" where the record starts, for messages
    error: str | None = None  # set when the record could not be read
    explicit: bool = False  # ``id`` is the record's own field, not its index

    @property
    def key(self) -> str:
        """The resume key: unique per record, compared with those in an output file."""
        if not self.explicit:
            return f"#{self.index}"
        text = id_key(self.id)
        # Escaping a leading "#" keeps explicit keys out of the "#<index>" space.
        return "#" + text if text.startswith("#") else text

    @property
    def legacy_key(self) -> str:
        """The key output files written before :attr:`key` existed used (the bare id)."""
        return id_key(self.id)


def id_key(value: Any) -> str:
    """Compare ids as text, so that a JSON ``7`` and a CSV ``"7"`` are the same record."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def check_input(path: str | Path) -> Path:
    """The input as a Path, after checking it exists and has a known extension."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise ChatforgeError(
            f"input file {path} has an unknown extension {suffix or '(none)'!r}; "
            f"use one of: {', '.join(INPUT_SUFFIXES)}"
        )
    if not p.is_file():
        what = "does not exist" if not p.exists() else "is not a file"
        raise ChatforgeError(f"input file {path} {what}")
    return p


def read_records(path: str | Path) -> Iterator[Record]:
    """The records of a ``.txt``, ``.jsonl`` or ``.csv`` file, in order."""
    p = check_input(path)
    reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}[p.suffix.lower()]
    return reader(p)


def records_from(
    items: Iterable[str | Mapping[str, Any]], name: str = "<input>"
) -> Iterator[Record]:
    """Records from Python values: a string is ``{"text": s}``, a mapping is the fields."""
    for i, item in enumerate(items):
        source = f"{name}:{i + 1}"
        if isinstance(item, str):
            yield Record(i, i, {"text": item}, source)
        elif isinstance(item, Mapping):
            fields = dict(item)
            yield _with_id(i, fields, source, "id" in fields)
        else:
            msg = f"{source}: a record must be a string or a mapping (got {type(item).__name__})"
            yield Record(i, i, {}, source, msg)


def _with_id(index: int, fields: dict[str, Any], source: str, explicit: bool) -> Record:
    """A readable record: its own ``id`` when ``explicit``, else its index."""
    rid = fields["id"] if explicit else index
    return Record(index, rid, fields, source, explicit=explicit)


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line_number, text, decode_error)`` for each line, decoded one line at a time.

    Decoding per line (rather than opening the file as text) keeps one bad byte
    from ending the run: only its line becomes an error record.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark (Windows editors)
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as e:
                yield number, None, f"not UTF-8 text ({e.reason} at byte {e.start})"


def _read_txt(path: Path) -> Iterator[Record]:
    index = 0
    for number, text, err in _lines(path):
        source = f"{path}:{number}"
        if err is not None:
            yield Record(index, index, {}, source, f"{source}: {err}")
        elif not text.strip():
            continue  # blank lines separate nothing and are not records
        else:
            yield Record(index, index, {"text": text}, source)
        index += 1


def _read_jsonl(path: Path) -> Iterator[Record]:
    index = 0
    for number, text, err in _lines(path):
        source = f"{path}:{number}"
        if err is None and text is not None and not text.strip():
            continue
        if err is None:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                err = f"not valid JSON ({e.msg} at column {e.colno})"
            else:
                if isinstance(value, str):
                    value = {"text": value}
                if isinstance(value, dict):
                    yield _with_id(index, value, source, "id" in value)
                    index += 1
                    continue
                err = f"a JSONL line must be an object or a string (got {type(value).__name__})"
        yield Record(index, index, {}, source, f"{source}: {err}")
        index += 1


_EOF = "\ud800<end of file>"
"""What :class:`_LineSource` hands ``csv.reader`` after the last line. A lone surrogate
never comes out of UTF-8 decoding, so this text cannot be in the file: seeing it at
the end of a field means a quote opened in that field was never closed."""


class _LineSource:
    """Feeds ``csv.reader``: counts the lines it has consumed (a quoted field may span
    lines), keeps the lines of the record being read, and ends with :data:`_EOF`.

    ``csv.reader`` silently takes everything up to the end of the file into a field
    whose quote is never closed; the :data:`_EOF` marker shows that happened, and
    :meth:`reread_after` hands the swallowed lines back to be read as records.
    """

    def __init__(self, f: Iterable[str]) -> None:
        self._it = iter(f)
        self._back: deque[str] = deque()  # lines to read again (see reread_after)
        self._ended = False
        self.lines = 0  # lines consumed
        self.record: list[str] = []  # the lines consumed since start_record()

    def __iter__(self) -> _LineSource:
        return self

    def __next__(self) -> str:
        if self._back:
            line = self._back.popleft()
        else:
            line = next(self._it, None)
            if line is None:
                if self._ended:
                    raise StopIteration
                self._ended = True
                return _EOF
        self.lines += 1
        self.record.append(line)
        return line

    def start_record(self) -> None:
        self.record = []

    def reread_after(self, first: int) -> None:
        """Read the current record's lines again, except its first (line ``first``)."""
        again = self.record[1:]
        self._back.extendleft(reversed(again))
        self.lines = first
        self._ended = False


def _read_csv(path: Path) -> Iterator[Record]:
    try:
        f = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ChatforgeError(f"cannot read input file {path}: {e.strerror}") from e
    with f:
        counter = _LineSource(f)
        reader = csv.reader(counter)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise ChatforgeError(f"{path}:1: cannot read the CSV header ({e})") from e
        if not header or header == [_EOF]:
            return
        if header[-1].endswith(_EOF):
            raise ChatforgeError(
                f"{path}:1: the CSV header has a quote that is never closed "
                "(it runs to the end of the file)"
            )
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or not all(header):
            raise ChatforgeError(
                f"{path}:1: the CSV header must name every column once (got {header})"
            )
        index = 0
        while True:
            start = counter.lines + 1
            source = f"{path}:{start}"
            counter.start_record()
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                # The text decoder has lost its place; later rows cannot be trusted.
                raise ChatforgeError(f"{source}: not UTF-8 text ({e.reason})") from e
            except csv.Error as e:
                yield Record(index, index, {}, source, f"{source}: malformed CSV row ({e})")
                index += 1
                continue
            if row == [_EOF]:
                return
            if row and row[-1].endswith(_EOF):
                # An unclosed quote took in every line after it: this record is
                # malformed, and the lines after its first are records of their own.
                counter.reread_after(start)
                msg = (
                    f"{source}: malformed CSV row (a quote in it is never closed; "
                    "the lines after this one are read as records of their own)"
                )
                yield Record(index, index, {}, source, msg)
                index += 1
                continue
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                msg = f"{source}: the row has {len(row)} fields but the header has {len(header)}"
                yield Record(index, index, {}, source, msg)
            else:
                fields = dict(zip(header, row, strict=True))
                yield _with_id(index, fields, source, fields.get("id", "") != "")
            index += 1
