"""Training data readers: a plain-text corpus, conversation JSONL (three shapes), chitchat.

The kind of a source is detected from its content (and can be overridden):

* ``text``: a ``.txt`` file or a folder of them, for language-model training;
* ``convmodel``: JSONL, each line a list of strings (turns alternate user/assistant);
* ``openai``: JSONL, each line ``{"messages": [{"role", "content"}, ...]}``;
* ``sharegpt``: JSONL, each line ``{"conversations": [{"from", "value"}, ...]}``;
* ``chitchat``: the corpus shipped by the ``chitchat-dataset`` package, named
  ``chitchat`` (consecutive messages of one sender joined into one turn).

A malformed line is never dropped silently: it is reported as
``file:line: what is wrong`` and either skipped and counted (``on_error="skip"``)
or turned into an error (``on_error="fail"``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.conversation.messages import Message
from chatforge.errors import ChatforgeError, ParamError

log = logging.getLogger(__name__)

KINDS = ("text", "convmodel", "openai", "sharegpt", "chitchat")
CHITCHAT = "chitchat"
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


class DataError(ChatforgeError, ValueError):
    """Training data that cannot be read; the message names the file (and line)."""


@dataclass
class Dataset:
    """What a source held: conversations (or texts, for a corpus) plus the problems met."""

    kind: str  # one of KINDS
    conversations: list[list[Message]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # kind == "text" only
    errors: list[str] = field(default_factory=list)  # "file:line: what is wrong", skipped lines
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts) if self.kind == "text" else len(self.conversations)

    def extend(self, other: Dataset) -> None:
        if len(self) and other.kind != self.kind and "text" in (self.kind, other.kind):
            raise DataError(
                f"cannot mix a plain-text corpus with conversation data "
                f"({', '.join(self.sources)} is {self.kind}, {other.sources[0]} is {other.kind})"
            )
        if not len(self):
            self.kind = other.kind
        self.conversations += other.conversations
        self.texts += other.texts
        self.errors += other.errors
        self.sources += other.sources

    def split_tail(self, fraction: float) -> tuple[Dataset, Dataset]:
        """``(head, tail)``: the last ``fraction`` of items (file order) held out for validation."""
        if not 0.0 < fraction < 1.0:
            raise ParamError("valid_split", f"must be in (0, 1), got {fraction}")
        n = len(self)
        k = max(1, int(round(n * fraction)))
        if k >= n:
            raise DataError(f"too little data to hold out {fraction:.0%} for validation ({n})")
        head = Dataset(self.kind, sources=list(self.sources), errors=list(self.errors))
        tail = Dataset(self.kind, sources=list(self.sources))
        if self.kind == "text":
            head.texts, tail.texts = self.texts[: n - k], self.texts[n - k :]
        else:
            head.conversations = self.conversations[: n - k]
            tail.conversations = self.conversations[n - k :]
        return head, tail


def load_data(
    sources: str | Path | Iterable[str | Path],
    kind: str | None = None,
    on_error: str = "skip",
    warn: Callable[[str], None] | None = None,
) -> Dataset:
    """Read one or more sources into a :class:`Dataset`.

    ``kind`` overrides detection; ``on_error`` is ``"skip"`` (count the bad line,
    report it through ``warn``) or ``"fail"`` (raise :class:`DataError`).
    """
    if on_error not in ("skip", "fail"):
        raise ParamError("on_error", f"must be 'skip' or 'fail', got {on_error!r}")
    if kind is not None and kind not in KINDS:
        raise ParamError("data_format", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out = Dataset(kind or "text")
    for src in sources:
        ds = _load_one(str(src), kind, on_error, warn)
        out.extend(ds)
    if not len(out):
        raise DataError(f"no usable training data in {', '.join(map(str, out.sources))}")
    return out


def detect_kind(source: str) -> str:
    """The kind of ``source``, from its name (chitchat, .txt, folder) or its first JSON line."""
    if source == CHITCHAT:
        return CHITCHAT
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data file {source} does not exist (nor is it a known corpus: chitchat)")
    if path.is_dir() or path.suffix.lower() == ".txt":
        return "text"
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                return "text"  # not JSON at all: a corpus with another extension
            shape = _shape(obj)
            if shape is not None:
                return shape
    raise DataError(
        f"{source}: cannot tell the data format (no line is a list of strings, "
        "{'messages': ...} or {'conversations': ...}); pass --data-format"
    )


def _shape(obj: Any) -> str | None:
    if isinstance(obj, list):
        return "convmodel"
    if isinstance(obj, dict) and "messages" in obj:
        return "openai"
    if isinstance(obj, dict) and "conversations" in obj:
        return "sharegpt"
    return None


def _load_one(
    source: str, kind: str | None, on_error: str, warn: Callable[[str], None] | None
) -> Dataset:
    kind = kind or detect_kind(source)
    if kind == CHITCHAT:
        ds = Dataset(CHITCHAT, conversations=load_chitchat(source))
    elif kind == "text":
        ds = Dataset("text", texts=_read_texts(source))
    else:
        ds = Dataset(kind)
        ds.conversations = read_jsonl(source, _PARSERS[kind], on_error, ds.errors, warn)
    ds.sources = [source]
    return ds


def read_jsonl(
    source: str,
    parse: Callable[[Any], Any],
    on_error: str,
    errors: list[str],
    warn: Callable[[str], None] | None = None,
    what: str = "data file",
) -> list[Any]:
    """``parse(obj)`` of each JSON line of ``source``; a line that is not JSON or that
    ``parse`` refuses (ValueError) is ``file:line: why``: appended to ``errors`` and
    passed to ``warn`` (``on_error="skip"``), or raised (``"fail"``)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{what} {source} does not exist")
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, source, lineno)
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except ValueError as e:
                msg = f"{source}:{lineno}: {_why(e)}"
                if on_error == "fail":
                    raise DataError(msg + " (use --on-error skip to skip bad lines)") from e
                errors.append(msg)
                if warn is not None:
                    warn(msg)
    return out


def _why(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg} at column {e.colno})"
    return str(e)


def _read_texts(source: str) -> list[str]:
    path = Path(source).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"folder {source} has no .txt files")
    texts = []
    for f in files:
        text = _decode(f.read_bytes(), str(f) if path.is_dir() else source)
        if text.strip():
            texts.append(text)
    return texts


def _not_text(source: str, lineno: int, what: str) -> DataError:
    return DataError(
        f"{source}:{lineno}: {what}: this is not UTF-8 text (a binary file?); "
        "training data must be UTF-8 text or JSONL"
    )


def _decode_line(raw: bytes, source: str, lineno: int) -> str:
    """One line as text; bytes that are not UTF-8 (or a NUL) reject the whole file.

    Decoding with ``errors="replace"`` would train the model on the garbage of a
    binary file renamed ``.jsonl``/``.txt``; it is a wrong file, not a bad line,
    so ``--on-error skip`` does not apply.
    """
    return _decode(raw, source, lineno)


def _decode(raw: bytes, source: str, first_line: int = 1) -> str:
    """``raw`` as text, else a :class:`DataError` naming the line and column (in bytes)
    of the first sign of a binary file: a byte that is not UTF-8, or a NUL."""
    text: str | None
    try:
        text, bad = raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError as e:
        text, bad = None, e.start
    nul = raw.find(b"\x00", 0, bad)  # valid UTF-8, but no text file holds a NUL
    if text is not None and nul < 0:
        return text
    at = nul if nul >= 0 else bad
    what = "NUL byte" if nul >= 0 else f"byte 0x{raw[at]:02x}"
    lineno = first_line + raw.count(b"\n", 0, at)
    col = at - (raw.rfind(b"\n", 0, at) + 1) + 1
    raise _not_text(source, lineno, f"{what} at column {col}")


def _check_turns(msgs: list[Message]) -> list[Message]:
    if not any(m.role == "assistant" for m in msgs):
        raise ValueError("no assistant turn: nothing to learn from this conversation")
    return msgs


def parse_convmodel(obj: Any) -> list[Message]:
    """``["hi", "hello!", ...]``: turns alternate user / assistant, starting with the user."""
    if not isinstance(obj, list):
        raise ValueError(f"expected a list of strings, got {type(obj).__name__}")
    if len(obj) < 2:
        raise ValueError("a conversation needs at least 2 turns")
    for i, t in enumerate(obj):
        if not isinstance(t, str):
            raise ValueError(f"turn {i} is {type(t).__name__}, expected a string")
    return [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(obj)]


def parse_openai(obj: Any) -> list[Message]:
    """``{"messages": [{"role": ..., "content": ...}, ...]}``."""
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise ValueError('expected {"messages": [{"role": ..., "content": ...}, ...]}')
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'message {i} needs "role" and "content"')
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content is {type(m['content']).__name__}, not text")
        out.append(Message(m["role"], m["content"]))
    return _check_turns(out)


def parse_sharegpt(obj: Any) -> list[Message]:
    """``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``."""
    turns = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError('expected {"conversations": [{"from": ..., "value": ...}, ...]}')
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ValueError(f'turn {i} needs "from" and "value"')
        role = _SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise ValueError(f"turn {i} is from unknown speaker {t['from']!r}")
        if not isinstance(t["value"], str):
            raise ValueError(f"turn {i} value is {type(t['value']).__name__}, not text")
        out.append(Message(role, t["value"]))
    return _check_turns(out)


_PARSERS: dict[str, Callable[[Any], list[Message]]] = {
    "convmodel": parse_convmodel,
    "openai": parse_openai,
    "sharegpt": parse_sharegpt,
}


def chitchat_path() -> Path:
    """``dataset.json`` of the installed ``chitchat-dataset`` package (never downloaded)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the chitchat corpus needs its package: pip install chitchat-dataset")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "dataset.json"
        if p.exists():
            return p
    raise DataError("chitchat-dataset is installed but has no dataset.json; reinstall it")


def load_chitchat(name: str = CHITCHAT) -> list[list[Message]]:
    """The chitchat conversations in the file's order; the two speakers become user/assistant.

    In the file a conversation is a list of *runs* of messages; consecutive
    messages of one sender (within or across runs) become one turn, their texts
    joined by a space, so turns alternate. Conversations with a single speaker
    (about 3,150 of 7,168) have no reply and are left out.
    """
    data = json.loads(chitchat_path().read_text(encoding="utf-8"))
    convs = []
    for key in data:  # dict order = file order, deterministic
        turns: list[list[str]] = []
        last_sender = None
        for run in data[key].get("messages", []):
            for m in run:
                text = str(m.get("text", "")).strip()
                if not text:
                    continue
                if m.get("sender") != last_sender or not turns:
                    turns.append([])
                    last_sender = m.get("sender")
                turns[-1].append(text)
        if len(turns) >= 2:
            convs.append(parse_convmodel([" ".join(t) for t in turns]))
    return convs
