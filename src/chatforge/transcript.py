"""Chat transcripts, appended and flushed one message at a time.

``.jsonl``: one JSON object per message (``role``, ``content``; replies also
carry the generation parameters, token counts, finish reason and seconds).
Any other extension: a readable text transcript. Each message is written with
a single ``write`` of a whole line (or block), flushed and fsynced, so a crash
can at worst lose the message being written, never corrupt earlier ones.
"""

from __future__ import annotations

import json
import os
import time
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
