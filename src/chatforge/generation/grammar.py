"""Structured output: replies that follow a grammar (a JSON Schema, a Lark grammar).

A :class:`GrammarConstraint` is a logits processor: before each sampling step it
asks `llguidance <https://github.com/guidance-ai/llguidance>`_ (the grammar
engine llama.cpp and vLLM use) which tokens may come next and sets every other
token's logit to ``-inf``. When the grammar is complete only the end-of-reply
token is allowed, so a constrained reply ends exactly where its JSON does.

llguidance was chosen over xgrammar for its per-token cost (the mask is
computed lazily from a token trie, ~0.1-1 ms for JSON on a 49k vocabulary, see
``bench/bench_structured.py``) and its schema coverage (``$ref``/``$defs`` as
pydantic emits them, enums, ``anyOf``, numeric and length bounds, and a
``lenient`` mode that ignores keywords it does not implement instead of failing).

JSON is generated in the usual pretty-inline form (``{"a": 1, "b": [1, 2]}``):
no free whitespace, so a small model cannot wander into endless blank space, and
``", "``/``": "`` separators, which models have seen far more often than the
compact form. A schema's ``x-guidance`` key can override these options.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chatforge.errors import InputError, ParamError
from chatforge.generation.processors import LogitsProcessor, SequenceView
from chatforge.generation.schema import (
    json_schema_grammar,
    llguidance_module,
)

# One llguidance tokenizer per (tokenizer, vocabulary, stop tokens): building it walks
# the whole vocabulary (~0.3 s for 49k tokens), so it is done once per model.
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()

# Closing a reply that runs out of budget prefers, of the allowed tokens, the end token,
# then tokens that finish what is open: inside a JSON string, a closing quote (possibly
# with brackets: ``"]}``), then a quote with a separator (``",``); outside one, closing
# brackets, then separators (``, "`` before a key that must come), then a bare quote
# (a string value that must come). Anything else comes last.
_STOP, _FIRST, _SECOND, _THIRD, _OTHER = 0, 1, 2, 3, 4
_CLASSES = (_STOP, _FIRST, _SECOND, _THIRD)
_CLOSERS = frozenset('"]}')
_SEPARATORS = frozenset('"]}, \n')


def _class_in_string(text: str) -> int:
    if not text.startswith('"'):
        return _OTHER
    rest = set(text[1:])
    return _FIRST if rest <= _CLOSERS else _SECOND if rest <= _SEPARATORS else _OTHER


def _class_outside(text: str) -> int:
    chars = set(text)
    if not chars:
        return _OTHER
    if chars <= {"]", "}"}:
        return _FIRST
    if chars <= _SEPARATORS and text != '"':
        return _SECOND
    return _THIRD if text == '"' else _OTHER


def _in_string_after(text: str, state: tuple[bool, bool]) -> tuple[bool, bool]:
    """JSON lexical state ``(inside a string, after a backslash)`` after ``text``."""
    inside, escaped = state
    for ch in text:
        if not inside:
            inside = ch == '"'
        elif escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            inside = False
    return inside, escaped


@dataclass(frozen=True)
class GrammarVocab:
    """llguidance's tokenizer for one model and what closing needs to know of each token."""

    ll: Any
    """The ``llguidance.LLTokenizer``."""
    texts: list[str]
    """Each token's text (bytes that are not UTF-8 alone as U+FFFD)."""
    class_words: tuple[Tensor, Tensor]
    """Outside and inside a JSON string: (len(_CLASSES), W) int32, the tokens of each
    closing class as a packed bitmask like llguidance's (bit ``t % 32`` of word ``t // 32``)."""
    class_ids: tuple[list[Tensor], list[Tensor]]
    """Outside and inside a JSON string: per closing class, its token ids, shortest first."""
    by_length: Tensor
    """(V,) int64: token ids, shortest text first (ties among a class go to the shortest)."""
    by_fill: Tensor
    """(N,) int64: the tokens that can only add characters to a JSON string (no quote,
    backslash or partial UTF-8), longest text first: how a string below its
    ``minLength`` is filled in the fewest tokens."""
    stop_words: Tensor
    """(W,) int32: the stop tokens, packed."""


def _fills_string(text: str) -> bool:
    """Whether ``text`` only adds characters inside a JSON string (no escape, no end)."""
    return bool(text) and not any(ch in text for ch in '"\\\ufffd')


def _pack(ids: Sequence[int] | Tensor, width: int) -> Tensor:
    """Token ids -> a (W,) int32 bitmask."""
    bits = torch.zeros(_words(width) * 32, dtype=torch.int64)
    bits[torch.as_tensor(ids, dtype=torch.long)] = 1
    words = (bits.view(-1, 32) << torch.arange(32)).sum(-1)  # (W,) in 0..2**32-1
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # as signed int32


def _has(words: Tensor, ids: Tensor) -> Tensor:
    """Bits of ``ids`` (N,) in the packed mask ``words`` (W,) -> (N,) bool."""
    return ((words[ids >> 5] >> (ids & 31).to(torch.int32)) & 1).bool()


def grammar_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> GrammarVocab:
    """llguidance's view of a Hugging Face fast tokenizer: ``vocab_size`` logits wide,
    ``stop_ids`` the tokens that end a reply (allowed once the grammar is complete)."""
    key = (int(vocab_size), tuple(sorted(stop_ids)))
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(tokenizer, {})
        if key in cached:
            return cached[key]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(
            "structured output needs a fast (Rust) tokenizer; this model's "
            f"{type(tokenizer).__name__} has none"
        )
    backend = copy(backend)  # the copy's padding/truncation settings can be changed
    backend.no_padding()
    backend.no_truncation()
    ll = llguidance_module().LLTokenizer(
        backend.to_str(), n_vocab=int(vocab_size), eos_token=sorted(stop_ids)
    )
    n = min(vocab_size, ll.vocab_size)
    texts = [ll.decode_bytes([t]).decode("utf-8", "replace") for t in range(n)]
    texts += [""] * (vocab_size - n)
    stops = set(stop_ids)
    by_length = sorted(range(vocab_size), key=lambda t: len(texts[t]))
    by_fill = [t for t in reversed(by_length) if t not in stops and _fills_string(texts[t])]
    packed, listed = [], []
    for classify in (_class_outside, _class_in_string):
        klass = [_STOP if t in stops else classify(text) for t, text in enumerate(texts)]
        ids_of = [[t for t in by_length if klass[t] == c] for c in _CLASSES]
        packed.append(torch.stack([_pack(ids, vocab_size) for ids in ids_of]))
        listed.append([torch.tensor(ids, dtype=torch.long) for ids in ids_of])
    vocab = GrammarVocab(
        ll,
        texts,
        (packed[0], packed[1]),
        (listed[0], listed[1]),
        torch.tensor(by_length, dtype=torch.long),
        torch.tensor(by_fill, dtype=torch.long),
        _pack(sorted(stops), vocab_size),
    )
    with _TOKENIZERS_LOCK:
        _TOKENIZERS.setdefault(tokenizer, {})[key] = vocab
    return vocab


CLOSING_WINDOW = 64
"""Slack (tokens left beyond the estimated cost of closing) below which a constrained
reply checks at every step that it can still close; above it, checks are spaced out."""
CLOSING_MARGIN = 4
"""Tokens kept in hand beyond the estimated cost of closing."""


class GrammarConstraint(LogitsProcessor):
    """Allow only the tokens that keep the reply inside ``grammar``.

    Build it with a grammar from :func:`json_schema_grammar` or :func:`lark_grammar`;
    the engine gives each sequence its own parser (:meth:`bind`), so one constraint
    may serve many requests (``n`` choices, a batch file).

    With ``close=True`` a reply never ends cut short when its budget can hold the
    grammar's shortest finish (:meth:`shortest_reply` says how long that is). The reply
    keeps an estimate of the shortest way to finish from where it is (a walk on a copy
    of the parser: forced text as llguidance tokenises it, the closing classes below,
    strings below their ``minLength`` filled with the longest tokens), checked at
    every step once the budget comes within :data:`CLOSING_WINDOW` tokens of it and
    at spaced steps before. Once only that many tokens (plus :data:`CLOSING_MARGIN`)
    are left it finishes: each step keeps, of the allowed tokens, the best class (the
    end token, then what closes the open string or brackets, separators) and the
    model picks among those; where none of them may come (forced text, a string that
    must grow, a choice of branch) the estimated finish is followed token by token. A
    135M model that lists ``"John", "John", ...`` forever still returns valid JSON.
    """

    def __init__(
        self,
        grammar: str,
        *,
        name: str = "json_schema",
        close: bool = True,
        close_after: str = "",
    ) -> None:
        self.grammar = grammar
        self.name = name  # the setting to name in errors
        self.close = close
        self.close_after = close_after  # close only replies that start so (a tool call)
        self.head = ""  # the reply's first characters (for close_after)
        self.vocab: GrammarVocab | None = None
        self.matcher: Any = None  # this sequence's parser state, once bound
        self.consumed = 0  # generated tokens fed to the matcher so far
        self.closing = False  # finishing the reply within its budget
        self.lexer = (False, False)  # JSON (inside a string, after a backslash) so far
        # The shortest finish found from here (end token not included), while the reply
        # has followed it since it was found; None: to be estimated again.
        self.finish: deque[int] | None = None
        self.next_check = 0  # generated tokens at which to check the closing cost again

    @classmethod
    def from_json_schema(
        cls, schema: dict[str, Any], *, lenient: bool = False
    ) -> GrammarConstraint:
        """A constraint to replies matching the JSON Schema ``schema``."""
        return cls(json_schema_grammar(schema, lenient=lenient))

    def bind(self, engine: Any) -> GrammarConstraint:
        vocab = grammar_tokenizer(engine.tokenizer, engine.vocab_size, engine.stop_token_ids)
        bound = GrammarConstraint(
            self.grammar, name=self.name, close=self.close, close_after=self.close_after
        )
        bound.vocab = vocab
        bound.matcher = llguidance_module().LLMatcher(vocab.ll, self.grammar, log_level=0)
        if bound.matcher.is_error():
            raise ParamError(self.name, f"cannot be enforced: {bound.matcher.get_error()}")
        return bound

    def shortest_reply(self, engine: Any, limit: int) -> int | None:
        """Tokens (the end token included) of the shortest complete reply found for
        ``engine``'s model, or None when it takes more than ``limit``.

        A reply whose budget holds this many tokens always completes (``close=True``);
        a request that must complete (a required tool call) can be refused below it.
        """
        finish = self.bind(engine)._shortest_finish(limit)
        return None if finish is None else len(finish) + 1

    @classmethod
    def process(
        cls, procs: Sequence[LogitsProcessor], views: Sequence[SequenceView], logits: Tensor
    ) -> Tensor:
        b, v = logits.shape
        mask = torch.zeros((b, _words(v)), dtype=torch.int32)  # (B, V/32): bit t = allowed
        for i, (p, view) in enumerate(zip(procs, views, strict=True)):
            assert isinstance(p, GrammarConstraint) and p.matcher is not None, "not bound"
            p._catch_up(view.generated_ids)
            p._fill(mask[i])
            if p._must_close(view, mask[i]):
                mask[i] = p._closing_mask(mask[i], view)
        # The mask is built on the CPU (the parser is host code); one copy to the logits'.
        return logits.masked_fill(~unpack_bits(mask, v).to(logits.device), float("-inf"))

    # -- one sequence ----------------------------------------------------------------

    def _catch_up(self, generated: Sequence[int]) -> None:
        """Feed the parser the tokens sampled since the last step."""
        new = list(generated[self.consumed :])
        assert self.vocab is not None
        for t in new:
            self.lexer = _in_string_after(self.vocab.texts[t], self.lexer)
            if len(self.head) < len(self.close_after):
                self.head += self.vocab.texts[t]
            # A token on the estimated finish leaves the rest of it a way to finish; any
            # other token may change the cost (a key that opens a nested object).
            if self.finish and self.finish[0] == t:
                self.finish.popleft()
            else:
                self.finish = None
        if new and not self.matcher.consume_tokens(new):
            raise RuntimeError(
                f"the reply left the {self.name} grammar: {self.matcher.get_error()}"
            )
        self.consumed = len(generated)

    def _fill(self, row: Tensor, matcher: Any = None) -> None:
        m = matcher or self.matcher
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        if m.is_error():
            raise RuntimeError(f"{self.name}: {m.get_error()}")

    def _best(self, allowed: Tensor, lexer: tuple[bool, bool]) -> tuple[Tensor, Tensor, int]:
        """(the allowed tokens of the best class present, packed; that class's token
        ids shortest first, or all ids when no class is present; the class)."""
        assert self.vocab is not None
        ctx = 1 if lexer[0] and not lexer[1] else 0
        classes = zip(_CLASSES, self.vocab.class_words[ctx], self.vocab.class_ids[ctx], strict=True)
        for klass, words, ids in classes:
            chosen = allowed & words
            if bool(chosen.any()):
                return chosen, ids, klass
        return allowed, self.vocab.by_length, _OTHER

    def _must_close(self, view: SequenceView, allowed: Tensor) -> bool:
        """Whether the reply must finish now (``allowed``: this step's packed mask)."""
        if not self.close or self.closing or view.budget is None:
            return self.closing
        if not self.head.startswith(self.close_after):
            return False
        assert self.vocab is not None
        generated = len(view.generated_ids)
        left = view.budget - generated
        if bool((allowed & self.vocab.stop_words).any()):
            # It may end here or go on with another call or item, which can cost far more
            # than one token: go on only if that fits (with the margin), and check the
            # next step, where it begins.
            more = self._shortest_finish(left, go_on=True)
            self.closing = more is None or left - (len(more) + 1) <= CLOSING_MARGIN
            self.finish = deque()
            self.next_check = generated + 1
            return self.closing
        if self.finish is None:  # a known finish costs nothing to check; a walk does
            if generated < self.next_check:
                return False
            self.finish = self._shortest_finish(left)
        if self.finish is None:  # it cannot finish any more: close as best it can
            self.closing = True
            return True
        slack = left - (len(self.finish) + 1)
        self.closing = slack <= CLOSING_MARGIN
        # Far from the budget, look again halfway to the window: a finish that grows
        # (the model opens nested objects) is seen long before it stops fitting.
        self.next_check = generated + max(1, (slack - CLOSING_WINDOW) // 2 + 1)
        return self.closing

    def _closing_mask(self, allowed: Tensor, view: SequenceView) -> Tensor:
        """Of the allowed tokens (packed (W,) int32), those a closing reply may take."""
        chosen, _, klass = self._best(allowed, self.lexer)
        if klass != _OTHER:  # the model picks what closes (``"`` or ``"]}``, ``}``...)
            return chosen
        # Nothing closing may come (forced text, a string below its minLength, a choice
        # of branch): a free pick could cost more than is left, so follow the finish.
        left = view.budget - len(view.generated_ids) if view.budget is not None else 0
        if self.finish is None:
            self.finish = self._shortest_finish(left)
        if not self.finish:  # it cannot finish within the budget: the best class
            return chosen
        only = torch.zeros_like(allowed)
        tok = self.finish[0]
        only[tok >> 5] = _as_int32(1 << (tok & 31))
        return only

    def _shortest_finish(self, limit: int, go_on: bool = False) -> deque[int] | None:
        """The tokens (the end token not included) of the shortest way found to finish
        from here, when it takes at most ``limit`` tokens with the end token; else None.
        ``go_on``: not ending here (the cost of one more call or item).

        Greedy on a copy of the parser: text the grammar forces is taken as llguidance
        tokenises it; otherwise the best closing class, ties going to the shortest
        token, except inside a string that must grow (filled with the longest tokens).
        """
        assert self.vocab is not None
        vocab = self.vocab
        m = self.matcher.deep_copy()
        row = torch.zeros(vocab.stop_words.numel(), dtype=torch.int32)
        lexer = self.lexer
        finish: deque[int] = deque()
        while len(finish) < limit:
            self._fill(row, m)
            if go_on and not finish:  # the first token must not be the end
                row &= ~vocab.stop_words
            elif bool((row & vocab.stop_words).any()):
                return finish
            forced = [] if go_on and not finish else m.compute_ff_tokens()
            steps = forced or [self._walk_token(row, lexer)]
            for tok in steps:
                if tok is None or not m.consume_token(tok):
                    return None
                lexer = _in_string_after(vocab.texts[tok], lexer)
                finish.append(tok)
        return None

    def _walk_token(self, allowed: Tensor, lexer: tuple[bool, bool]) -> int | None:
        """The token the shortest finish takes next where nothing is forced."""
        assert self.vocab is not None
        chosen, ordered, klass = self._best(allowed, lexer)
        if klass == _OTHER and lexer[0] and not lexer[1]:  # a string that must grow
            tok = _first_allowed(chosen, self.vocab.by_fill)
            if tok is not None:
                return tok
        return _first_allowed(chosen, ordered)


def _as_int32(word: int) -> int:
    """An unsigned 32-bit mask word as the signed value an int32 tensor holds."""
    return word - 2**32 if word >= 2**31 else word


def _first_allowed(words: Tensor, ordered: Tensor) -> int | None:
    """The first of ``ordered`` token ids set in the packed mask ``words``; the shortest
    tokens are tried first, as one is nearly always allowed."""
    for part in (ordered[:256], ordered[256:]):
        hits = _has(words, part).nonzero()
        if len(hits):
            return int(part[hits[0, 0]])
    return None


def _words(width: int) -> int:
    return (width + 31) // 32


def unpack_bits(mask: Tensor, width: int) -> Tensor:
    """(B, W) int32 bitmasks -> (B, width) bool, bit ``t % 32`` of word ``t // 32``."""
    shifts = torch.arange(32, dtype=torch.int32)  # (32,)
    bits = (mask.unsqueeze(-1) >> shifts) & 1  # (B, W, 32)
    return bits.reshape(mask.shape[0], -1)[:, :width].bool()


def config_processors(config: Any) -> list[LogitsProcessor]:
    """The processors a :class:`~chatforge.generation.config.GenerationConfig` asks for:
    a grammar for ``json_schema`` (its ``logit_bias`` and penalties are sampling
    parameters, :class:`~chatforge.generation.sampling.SamplingParams`)."""
    if config.json_schema is None:
        return []
    return [GrammarConstraint.from_json_schema(config.json_schema)]
