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

import functools
import json
import threading
import weakref
from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chatforge.generation.processors import LogitsProcessor, SequenceView

JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""How constrained JSON is spelled (llguidance ``JsonCompileOptions``)."""

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
"""The schema of OpenAI's ``response_format: {"type": "json_object"}``."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError(
            "structured output needs the llguidance package: pip install llguidance"
        ) from e
    return llguidance


def json_schema_grammar(schema: dict[str, Any], *, lenient: bool = False) -> str:
    """The llguidance grammar of replies matching ``schema``; ValueError naming
    ``json_schema`` when the schema is not one we can enforce.

    ``lenient``: ignore keywords llguidance does not implement (OpenAI's
    non-strict mode) instead of failing on them.
    """
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON object (got {type(schema).__name__})")
    try:
        key = json.dumps(schema)  # not sorted: property order is generation order
    except (TypeError, ValueError) as e:
        raise ValueError(f"json_schema is not JSON: {e}") from None
    return _schema_grammar(key, lenient)


@functools.lru_cache(maxsize=256)
def _schema_grammar(schema: str, lenient: bool) -> str:
    # Compiled once per schema: a config is validated where it is built and again
    # when its request is added, and a batch file repeats one schema on every row.
    llg = _llguidance()
    overrides = {"lenient": True} if lenient else None
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(
            schema, defaults=JSON_OPTIONS, overrides=overrides
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"json_schema is not a valid JSON Schema: {e}") from None
    _check(grammar, "json_schema")
    return grammar


def lark_grammar(text: str, *, name: str = "grammar") -> str:
    """The llguidance grammar of a Lark grammar (llguidance's dialect: ``%json{...}``
    embeds a JSON Schema); ValueError naming ``name`` when it is invalid."""
    grammar = _llguidance().LLMatcher.grammar_from_lark(text)
    _check(grammar, name)
    return grammar


def _check(grammar: str, name: str) -> None:
    error = _llguidance().LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"{name} cannot be enforced: {error}")


# One llguidance tokenizer per (tokenizer, vocabulary, stop tokens): building it walks
# the whole vocabulary (~0.3 s for 49k tokens), so it is done once per model.
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()

# Token classes for closing a reply that is running out of budget, best first.
_STOP, _CLOSER, _SEPARATOR, _OTHER = 0, 1, 2, 3
_CLOSER_CHARS = frozenset('"]}')
_SEPARATOR_CHARS = frozenset('"]}, \n')


@dataclass(frozen=True)
class GrammarVocab:
    """llguidance's tokenizer for one model and what closing needs to know of each token."""

    ll: Any
    """The ``llguidance.LLTokenizer``."""
    classes: Tensor
    """(V,) int8: :data:`_STOP`, :data:`_CLOSER` (only ``"]}``), :data:`_SEPARATOR`
    (only ``"]}``, commas, spaces, newlines) or :data:`_OTHER`."""
    lengths: Tensor
    """(V,) int32: bytes of each token (ties among others go to the shortest)."""


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
        raise ValueError(
            "structured output needs a fast (Rust) tokenizer; this model's "
            f"{type(tokenizer).__name__} has none"
        )
    backend = copy(backend)  # the copy's padding/truncation settings can be changed
    backend.no_padding()
    backend.no_truncation()
    ll = _llguidance().LLTokenizer(
        backend.to_str(), n_vocab=int(vocab_size), eos_token=sorted(stop_ids)
    )
    classes = torch.full((vocab_size,), _OTHER, dtype=torch.int8)
    lengths = torch.zeros(vocab_size, dtype=torch.int32)
    for t in range(min(vocab_size, ll.vocab_size)):
        text = ll.decode_bytes([t]).decode("utf-8", "replace")
        lengths[t] = len(text)
        if text and set(text) <= _CLOSER_CHARS:
            classes[t] = _CLOSER
        elif text and set(text) <= _SEPARATOR_CHARS:
            classes[t] = _SEPARATOR
    classes[list(stop_ids)] = _STOP
    vocab = GrammarVocab(ll, classes, lengths)
    with _TOKENIZERS_LOCK:
        _TOKENIZERS.setdefault(tokenizer, {})[key] = vocab
    return vocab


CLOSING_WINDOW = 64
"""Reply tokens left at which a constrained reply starts checking it can still close."""
CLOSING_MARGIN = 2
"""Tokens kept in hand beyond the estimated cost of closing."""


class GrammarConstraint(LogitsProcessor):
    """Allow only the tokens that keep the reply inside ``grammar``.

    Build it with a grammar from :func:`json_schema_grammar` or :func:`lark_grammar`;
    the engine gives each sequence its own parser (:meth:`bind`), so one constraint
    may serve many requests (``n`` choices, a batch file).

    With ``close=True`` a reply never ends cut short: within
    :data:`CLOSING_WINDOW` tokens of its budget it estimates how many tokens the
    shortest way to finish takes (walking the grammar greedily on a copy of the
    parser), and once only that many are left it finishes: each step keeps, of the
    allowed tokens, the best class (the end token, then closing quotes and brackets,
    then separators, then the rest) and the model picks among those. A 135M model that
    lists ``"John", "John", ...`` forever still returns valid JSON.
    """

    def __init__(self, grammar: str, *, name: str = "json_schema", close: bool = True) -> None:
        self.grammar = grammar
        self.name = name  # the setting to name in errors
        self.close = close
        self.vocab: GrammarVocab | None = None
        self.matcher: Any = None  # this sequence's parser state, once bound
        self.consumed = 0  # generated tokens fed to the matcher so far
        self.closing = False  # finishing the reply within its budget
        self.next_check = 0  # generated length at which to estimate closing again

    @classmethod
    def from_json_schema(
        cls, schema: dict[str, Any], *, lenient: bool = False
    ) -> GrammarConstraint:
        """A constraint to replies matching the JSON Schema ``schema``."""
        return cls(json_schema_grammar(schema, lenient=lenient))

    def bind(self, engine: Any) -> GrammarConstraint:
        vocab = grammar_tokenizer(engine.tokenizer, engine.vocab_size, engine.stop_token_ids)
        bound = GrammarConstraint(self.grammar, name=self.name, close=self.close)
        bound.vocab = vocab
        bound.matcher = _llguidance().LLMatcher(vocab.ll, self.grammar, log_level=0)
        if bound.matcher.is_error():
            raise ValueError(f"{self.name} cannot be enforced: {bound.matcher.get_error()}")
        return bound

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
        allowed = unpack_bits(mask, v)  # (B, V) bool
        for i, (p, view) in enumerate(zip(procs, views, strict=True)):
            assert isinstance(p, GrammarConstraint)
            if p._must_close(view):
                allowed[i] = p._best_class(allowed[i])
        return logits.masked_fill(~allowed, float("-inf"))

    # -- one sequence ----------------------------------------------------------------

    def _catch_up(self, generated: Sequence[int]) -> None:
        """Feed the parser the tokens sampled since the last step."""
        new = list(generated[self.consumed :])
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

    def _best_class(self, allowed: Tensor) -> Tensor:
        """Of the allowed tokens (V,) bool, those of the best class present."""
        assert self.vocab is not None
        for klass in (_STOP, _CLOSER, _SEPARATOR):
            chosen = allowed & (self.vocab.classes == klass)
            if chosen.any():
                return chosen
        return allowed

    def _must_close(self, view: SequenceView) -> bool:
        if not self.close or self.closing or view.budget is None:
            return self.closing
        done = len(view.generated_ids)
        left = view.budget - done
        if left > CLOSING_WINDOW or done < self.next_check:
            return False
        cost = self._closing_cost(left)
        if left <= cost + CLOSING_MARGIN:
            self.closing = True
        else:  # check again when it could first matter
            self.next_check = done + max(1, (left - cost - CLOSING_MARGIN) // 2)
        return self.closing

    def _closing_cost(self, limit: int) -> int:
        """Tokens the shortest way to finish takes from here (at most ``limit``): the
        closing policy run on a copy of the parser, ties going to the shortest token."""
        assert self.vocab is not None
        m = self.matcher.deep_copy()
        v = self.vocab.classes.numel()
        row = torch.zeros(_words(v), dtype=torch.int32)
        for steps in range(1, limit + 1):
            self._fill(row, m)
            allowed = self._best_class(unpack_bits(row[None], v)[0])
            if (allowed & (self.vocab.classes == _STOP)).any():
                return steps
            lengths = torch.where(allowed, self.vocab.lengths, torch.iinfo(torch.int32).max)
            if not m.consume_token(int(torch.argmin(lengths))):
                return limit
        return limit


def _words(width: int) -> int:
    return (width + 31) // 32


def unpack_bits(mask: Tensor, width: int) -> Tensor:
    """(B, W) int32 bitmasks -> (B, width) bool, bit ``t % 32`` of word ``t // 32``."""
    shifts = torch.arange(32, dtype=torch.int32)  # (32,)
    bits = (mask.unsqueeze(-1) >> shifts) & 1  # (B, W, 32)
    return bits.reshape(mask.shape[0], -1)[:, :width].bool()
