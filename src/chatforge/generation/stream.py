"""Turning generated token ids into final text, one token at a time.

Two things make streamed text tricky:

* a byte-level BPE token may end in the middle of a UTF-8 character, and
  SentencePiece tokenizers decode a token differently depending on what comes
  before it; we use the offset scheme of vLLM/TGI (decode a small window and
  emit what it adds) and hold back text that ends in U+FFFD;
* a stop string may arrive split across tokens, so text that could be the start
  of a stop string is held back until it is clearly not one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Detokenizer:
    """Incremental decoding of one sequence's generated ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this are already in the emitted text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes (may be empty)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return full[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still pending at the end. A reply cut in the middle of a character (its
        last bytes decode as U+FFFD) ends before that character, not on a broken one."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full[len(prefix_text) :].rstrip("\ufffd")


class StopMatcher:
    """Holds back text that might be the start of a stop string; cuts at a full match."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # all text so far (final text is text[:end] once stopped)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, new_text: str) -> str:
        """Add text; return what is now final. Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        self.text += new_text
        if not self.stop:
            out, self.emitted = self.text[self.emitted :], len(self.text)
            return out
        # A match can only involve text not yet emitted plus (len(stop)-1) chars before it.
        longest = max(len(s) for s in self.stop)
        start = max(0, self.emitted - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.emitted : cut]
            self.text, self.emitted, self.stopped = self.text[:cut], cut, True
            return out
        hold = self._holdback()
        end = len(self.text) - hold
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """Release held-back text at the end of generation (no stop string came)."""
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


class TextStream:
    """Detokenizer + stop matcher for one sequence: push ids, get final text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.detok = Detokenizer(tokenizer)
        self.matcher = StopMatcher(stop)

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared (the text is cut before it)."""
        return self.matcher.stopped

    @property
    def text(self) -> str:
        return self.matcher.text

    def push(self, token_id: int) -> str:
        return self.matcher.push(self.detok.push(token_id))

    def flush(self) -> str:
        """Everything still held back, at the end of the sequence."""
        out = self.matcher.push(self.detok.flush())
        return out + ("" if self.matcher.stopped else self.matcher.flush())
