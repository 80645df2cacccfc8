"""Chat transcripts, appended and flushed one message at a time.

``.jsonl``: one JSON object per message (``role``, ``content``; replies also
carry the generation parameters, token counts, finish reason and seconds).
Any other extension: a readable text transcript. Each message is written with
a single ``write`` of a whole line (or block), flushed and fsynced, so a crash
can at worst lose the message being written, never corrupt earlier ones.

:func:`read_transcript` reads either kind back (the chat command's ``/load``).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chatforge.errors import ChatforgeError


class TranscriptWriter:
    """Appends messages to a transcript file (JSONL or text by extension)."""

    def __init__(self, path: str | Path, jsonl: bool | None = None) -> None:
        self.path = Path(path).expanduser()
        self.jsonl = self.path.suffix.lower() == ".jsonl" if jsonl is None else jsonl
        if self.path.is_dir():
            raise ChatforgeError(f"output file {self.path} is a directory; give a file name")
        if not self.path.parent.exists():
            raise ChatforgeError(
                f"cannot write {self.path}: directory {self.path.parent} does not exist"
            )
        try:
            self._f: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise ChatforgeError(f"cannot write {self.path}: {e.strerror}") from e
        # A torn last line from an earlier crash must not glue onto our first line.
        if self.jsonl and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._write("\n")

    def _write(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()
        os.fsync(self._f.fileno())

    def message(self, role: str, content: str, **extra: Any) -> None:
        """Append one message; ``extra`` (params, token counts, ...) goes into JSONL rows."""
        if self.jsonl:
            row = {"role": role, "content": content, **extra}
            self._write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        if role == "system":
            block = f"[system] {content}\n\n"
        elif role == "user":
            block = f"User: {content}\n\n"
        else:
            note = ""
            reason = extra.get("finish_reason")
            if reason and reason != "stop":
                note = f" [{reason}]"
            block = f"Assistant: {content}{note}\n\n"
        self._write(block)

    def note(self, text: str) -> None:
        """A line for the reader of a text transcript (ignored in JSONL)."""
        if not self.jsonl:
            self._write(f"# {text} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n\n")

    def close(self) -> None:
        self._f.close()


@dataclass
class TranscriptEntry:
    """One message read back from a transcript; ``extra`` holds a reply's stats."""

    role: str
    content: str
    extra: dict[str, Any] = field(default_factory=dict)


_NOTE = re.compile(r"^# (.*) \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)$")
_START = re.compile(r"^(?:\[(system)\] |(User): |(Assistant): )")
_REASON = re.compile(r" \[([a-z_]+)\]$")


def read_transcript(path: str | Path) -> list[TranscriptEntry]:
    """The messages of a transcript written by :class:`TranscriptWriter`.

    The format follows the extension, as when writing. A text transcript's last
    ``new conversation`` note starts the conversation over; a torn JSONL line
    (a crash while writing) is skipped. Raises :class:`ChatforgeError` when the
    file cannot be read or holds no transcript.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChatforgeError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ChatforgeError(f"{path} is a directory; give a file name") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"cannot read {path}: {e}") from None
    jsonl = path.suffix.lower() == ".jsonl"
    entries = _read_jsonl(text, path) if jsonl else _read_text(text)
    if not entries and text.strip():
        raise ChatforgeError(f"{path} is not a chatforge transcript")
    return entries


def _read_jsonl(text: str, path: Path) -> list[TranscriptEntry]:
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn line from a crash
        if not isinstance(row, dict) or row.get("role") not in ("system", "user", "assistant"):
            raise ChatforgeError(f"{path} line {n} is not a transcript message")
        content = row.pop("content", "")
        if not isinstance(content, str):
            raise ChatforgeError(f"{path} line {n}: content must be text")
        entries.append(TranscriptEntry(row.pop("role"), content, row))
    return entries


def _read_text(text: str) -> list[TranscriptEntry]:
    entries: list[TranscriptEntry] = []
    lines: list[str] = []

    def finish() -> None:
        if entries:
            entries[-1].content = "\n".join(lines).rstrip("\n")
            if entries[-1].role == "assistant":
                m = _REASON.search(entries[-1].content)
                if m:
                    entries[-1].content = entries[-1].content[: m.start()]
                    entries[-1].extra["finish_reason"] = m.group(1)
        lines.clear()

    for line in text.split("\n"):
        note = _NOTE.match(line)
        start = _START.match(line)
        if note or start:
            finish()
        if note:
            if note.group(1) == "new conversation":
                entries.clear()
            elif entries:
                entries.append(TranscriptEntry("note", ""))  # ends the message before
            continue
        if start:
            role = (start.group(1) or start.group(2) or start.group(3)).lower()
            entries.append(TranscriptEntry(role, ""))
            lines.append(line[start.end() :])
        elif entries:
            lines.append(line)
    finish()
    return [e for e in entries if e.role != "note"]
