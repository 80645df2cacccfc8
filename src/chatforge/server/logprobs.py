"""Logprobs in the shapes OpenAI's APIs return them.

* ``/v1/completions`` (the legacy shape lm-evaluation-harness reads): parallel lists
  ``tokens``, ``token_logprobs`` (``None`` for a first prompt token, which has no
  context), ``top_logprobs`` (``{token: logprob}`` dicts) and ``text_offset``
  (character offsets into the returned text).
* ``/v1/chat/completions``: ``content`` entries ``{token, logprob, bytes, top_logprobs}``.

A token is labelled with its text decoded alone, unless its own bytes are not valid
UTF-8 (a byte-level BPE token holding part of a multi-byte character, a SentencePiece
``<0xE2>`` byte token): decoded alone those all read ``"\\ufffd"``, so like OpenAI we
label them ``bytes:`` plus each byte as ``\\xNN`` (``"bytes:\\xe2\\x80"``). ``bytes`` are
the token's real bytes (see :func:`_raw_bytes`), so joining a reply's ``bytes`` gives
the reply's UTF-8.

A stop token that ended the reply (EOS, ``<|im_end|>``) is the last generated token, as
vLLM and OpenAI's completions report it: it has its logprob and its label
(``"<|im_end|>"``) and is counted in ``completion_tokens``, but its text is not part of
the reply (so the joined ``bytes`` of a reply that ended that way are the reply's UTF-8
plus the stop token's).
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from chatforge.generation.types import TokenLogprob


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {ch: b for b, ch in _bytes_to_unicode().items()}
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _is_byte_level(tokenizer: Any) -> bool:
    """Whether the vocabulary is GPT-2 style byte-level (GPT-2, Llama-3, Qwen, SmolLM2)."""
    if isinstance(getattr(tokenizer, "byte_decoder", None), dict):  # slow GPT2Tokenizer
        return True
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return False
    try:
        spec = json.loads(decoder.__getstate__())
    except Exception:
        return False
    parts = (spec.get("decoders") or [spec]) if isinstance(spec, dict) else []
    return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in parts)


@dataclass
class _Token:
    raw: bytes  # the token's own bytes
    label: str  # how it is shown: its text, or "bytes:\xNN..." when raw is not UTF-8


@dataclass
class _Vocab:
    """One tokenizer's token labels and bytes, worked out per id on first use.

    It holds no reference to the tokenizer (it is the value of a weak-keyed cache).
    """

    byte_level: bool
    added: frozenset[int]
    cache: dict[int, _Token] = field(default_factory=dict)

    def get(self, tokenizer: Any, token_id: int) -> _Token:
        token = self.cache.get(token_id)
        if token is None:
            token = self.cache[token_id] = self._make(tokenizer, token_id)
        return token

    def _make(self, tokenizer: Any, token_id: int) -> _Token:
        text = tokenizer.decode(
            [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        raw = _raw_bytes(tokenizer, self, token_id, text)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return _Token(raw, "bytes:" + "".join(f"\\x{b:02x}" for b in raw))
        return _Token(raw, text)


def _raw_bytes(tokenizer: Any, vocab: _Vocab, token_id: int, text: str) -> bytes:
    """A token's bytes: through the byte-level table, from ``<0xNN>``, else ``text``'s UTF-8.

    Added and special tokens (``<|im_end|>``) are stored as plain text, not in the
    byte-level alphabet, so they always take their text.
    """
    if token_id not in vocab.added:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if vocab.byte_level and piece and all(ch in _BYTE_DECODER for ch in piece):
                return bytes(_BYTE_DECODER[ch] for ch in piece)
            if m := _SP_BYTE.fullmatch(piece):
                return bytes([int(m.group(1), 16)])
    return text.encode("utf-8")


_VOCABS: weakref.WeakKeyDictionary[Any, _Vocab] = weakref.WeakKeyDictionary()


def _tokens(tokenizer: Any) -> Callable[[int], _Token]:
    """``token id -> _Token`` for ``tokenizer``, cached per tokenizer."""
    try:
        vocab = _VOCABS.get(tokenizer)
    except TypeError:  # not weak-referenceable or hashable: no cache across calls
        vocab = None
    if vocab is None:
        added = set(getattr(tokenizer, "added_tokens_decoder", None) or ())
        added |= set(getattr(tokenizer, "all_special_ids", None) or ())
        vocab = _Vocab(_is_byte_level(tokenizer), frozenset(added))
        try:
            _VOCABS[tokenizer] = vocab
        except TypeError:
            pass
    return partial(vocab.get, tokenizer)


def legacy_logprobs(
    tokenizer: Any, entries: Sequence[tuple[int, TokenLogprob | None]], offset: int = 0
) -> dict[str, list]:
    """``(token id, its logprob or None)`` pairs -> the completions ``logprobs`` object.

    ``text_offset`` indexes the characters of all the tokens' bytes decoded together
    (``tokenizer.decode`` of them all, special tokens included, invalid bytes as U+FFFD),
    plus ``offset``: each token gets the index of the character its first byte is part
    of, so a token that continues a multi-byte character shares that character's offset
    (as in tiktoken's ``decode_with_offsets``) and offsets match the text however a
    character is split. (Adding up each token's own text, as before, counted one
    ``"\\ufffd"`` per byte token and ran past the text.) This is the returned text as
    long as it holds every token's text; generated text leaves special tokens out and
    ends at a stop string, which only moves offsets of tokens after those.
    """
    vocab = _tokens(tokenizer)
    chars = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, lp in entries:
        token = vocab(token_id)
        tokens.append(token.label)
        # Where the token's first byte lands: decode it after what came before, as if the
        # text ended there; it is in the last character that gives (a byte that cannot
        # continue a pending sequence first flushes that sequence as U+FFFD).
        state = chars.getstate()
        landed = len(chars.decode(token.raw[:1], final=True))
        chars.setstate(state)
        offsets.append(offset + max(landed - 1, 0) if token.raw else offset + landed)
        offset += len(chars.decode(token.raw))
        if lp is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(lp.logprob)
        alternatives: dict[str, float] = {}
        for alt_id, alt_lp in lp.top:  # best first
            key = vocab(alt_id).label
            if key in alternatives:
                # Two distinct tokens with one label (e.g. an added token spelled like a
                # vocabulary token). Overwriting would show the worse logprob and merging
                # would drop an alternative (callers ask for k and count on k), so the
                # better one keeps the label and this one is named by id, the way vLLM
                # spells ids ("token_id:N").
                key = f"token_id:{alt_id}"
            alternatives.setdefault(key, alt_lp)
        top.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], top: int) -> list[dict]:
    """Generated tokens' logprobs -> the chat ``logprobs.content`` list."""
    vocab = _tokens(tokenizer)

    def entry(token_id: int, logprob: float) -> dict:
        token = vocab(token_id)
        return {"token": token.label, "logprob": logprob, "bytes": list(token.raw)}

    return [
        {
            **entry(lp.token_id, lp.logprob),
            "top_logprobs": [entry(alt_id, alt_lp) for alt_id, alt_lp in lp.top[:top]],
        }
        for lp in entries
    ]
