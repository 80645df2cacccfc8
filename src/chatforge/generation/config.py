"""Generation settings: one validated dataclass shared by the library, CLI, chat and server.

:class:`GenerationConfig` holds every knob that decides *which* tokens a reply is
made of (temperature, top-k, top-p, min-p, penalties) and *how long* it may be
(``max_new_tokens``, ``max_length``, stop strings). It is validated as soon as
it is built, so a bad value fails at the flag or ``/set`` command that set it,
with a message naming the parameter and saying what to do, never deep inside a
decode step.

Length semantics follow Hugging Face: ``max_new_tokens`` counts reply tokens
only, ``max_length`` counts prompt + reply. :meth:`GenerationConfig.reply_budget`
turns both (and the model's context length) into the number of tokens a reply
may have for a given prompt, by asking the one rule for it,
:func:`chatforge.conversation.budget.reply_budget`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

# The reply-length rule lives below this module (conversation/budget.py); its default
# is re-exported here, where its users import it from.
from chatforge.conversation.budget import DEFAULT_MAX_NEW_TOKENS as DEFAULT_MAX_NEW_TOKENS
from chatforge.conversation.budget import context_caps_reply, reply_budget
from chatforge.errors import InputError, ParamError
from chatforge.generation.schema import json_schema_grammar

PRESETS: dict[str, dict[str, Any]] = {
    # Deterministic: always the most likely token.
    "precise": {"temperature": 0.0},
    # The chat default: a little variety, mild repetition control; a small model needs a
    # low temperature and a firm min-p. Measured on SmolLM2-135M (default fp32 + int8),
    # 20 seeds each of six factual questions (France, Japan, largest planet, Romeo and
    # Juliet, water, days in a week): min_p 0.1 answered Paris 18/20, 0.2 19/20;
    # temperature 0.1 also 19/20 but no better elsewhere. The others: 20/20 but the
    # planet (10-12/20 in every setting: the model says Neptune, greedy too).
    "balanced": {"temperature": 0.2, "top_p": 0.9, "min_p": 0.2, "repetition_penalty": 1.05},
    # More varied replies; min-p keeps the tail from producing nonsense.
    "creative": {"temperature": 1.0, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.05},
}
"""Named starting points for :meth:`GenerationConfig.from_preset`."""

DEFAULT_PRESET = "balanced"
"""The preset chat, generate and the Python API (:meth:`GenerationConfig.default`) start from."""

# Words that clear an optional setting (``/set seed off``) or turn a filter off.
_OFF_WORDS = frozenset({"none", "off", "null", "disable", "disabled"})
# The value each "can be switched off" parameter takes when it is off.
_OFF_VALUES: dict[str, Any] = {
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": None,
    "max_new_tokens": None,
    "max_length": None,
    "seed": None,
    "stop": (),
    "do_sample": None,
    "json_schema": None,
    "slide": False,
    "keep": None,
}
_FLOAT_PARAMS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
_INT_PARAMS = ("top_k", "no_repeat_ngram_size", "max_new_tokens", "max_length", "seed", "keep")
GREEDY_DROPS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "presence_penalty",
    "frequency_penalty",
)
"""Preset settings an explicit ``temperature=0`` drops (they change greedy tokens)."""
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "0"})


def _check_float(name: str, value: Any) -> float:
    """Return ``value`` as a finite float, or raise ParamError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParamError(name, f"must be a number (got {value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ParamError(name, f"must be a finite number (got {value})")
    return value


def _check_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """Return ``value`` as an int (``None`` allowed when ``optional``), or raise ParamError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an integer or None" if optional else "an integer"
        raise ParamError(name, f"must be {kind} (got {value!r})")
    return int(value)


def _check_bias(token: int, value: Any) -> float:
    """One ``logit_bias`` value as a float in [-100, 100], or a ParamError naming the token."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParamError("logit_bias", f"[{token}] must be a number (got {value!r})")
    bias = float(value)
    if not -100.0 <= bias <= 100.0:  # also false for nan
        raise ParamError("logit_bias", f"[{token}] must be in [-100, 100] (got {bias})")
    return bias


def _normalise_stop(value: Any) -> tuple[str, ...]:
    """Accept a single string or an iterable of strings; return a tuple of non-empty strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ParamError("stop", f"must be a string or a list of strings (got {value!r})") from None
    for item in items:
        if not isinstance(item, str):
            raise ParamError("stop", f"must contain only strings (got {item!r})")
        if item == "":
            raise ParamError("stop", "strings must not be empty; remove the empty entry")
    return items


def _unescape(text: str) -> str:
    r"""Turn the escapes a user can type on one line (``\n``, ``\t``, ``\\``) into characters."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def load_json_schema(text: str) -> dict[str, Any]:
    """A JSON Schema given as JSON text or as the path of a file holding it."""
    import json
    from pathlib import Path

    source = "the text"
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ParamError(
                "json_schema", f"must be a JSON object or a schema file (got {text!r})"
            )
        source, text = str(path), path.read_text(encoding="utf-8")
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise ParamError("json_schema", f": {source} is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ParamError("json_schema", f": {source} must hold a JSON object")
    return schema


@dataclass
class GenerationConfig:
    """How to pick reply tokens and when to stop. Validated on construction.

    One rule for defaults: **the constructor is neutral**. A field you do not give is
    off (no top-k, top-p, min-p or penalties) and the temperature is 1, the model's own
    distribution, as in OpenAI's API and Hugging Face's sampling. Opinions live in the
    presets: :meth:`default` is the ``balanced`` preset that ``chatforge chat`` and
    ``generate`` start from, and every chatforge entry point whose config is optional
    (:class:`~chatforge.chat.ChatSession`, :func:`~chatforge.batch.generate_batch`) uses
    :meth:`default` when given none; those talking to an endpoint
    (:class:`~chatforge.remote.RemoteSession`, ``--api-base``) use its values every
    endpoint takes (:func:`~chatforge.openai_api.remote_config`). The server and a bare
    :class:`~chatforge.generation.types.Request` keep the constructor's OpenAI semantics.

    Build it directly, from a preset (:meth:`from_preset`), or change one field at
    a time with :meth:`replace` / :meth:`set_param`; every path validates.
    """

    temperature: float = 1.0
    """Softmax temperature; higher is more random. ``0`` means greedy decoding. The
    constructor's ``1`` samples from the model's own distribution (OpenAI's default)."""
    top_k: int = 0
    """Sample only among the ``top_k`` most likely tokens. ``0`` turns it off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to
    ``top_p``. In ``(0, 1]``; ``1`` turns it off."""
    min_p: float = 0.0
    """Drop tokens less likely than ``min_p`` times the most likely one. In ``[0, 1)``;
    ``0`` turns it off."""
    repetition_penalty: float = 1.0
    """Divide positive / multiply negative logits of tokens already in the prompt or
    reply (Hugging Face semantics). ``> 0``; ``1`` turns it off."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size (prompt included). ``0`` turns it off."""
    presence_penalty: float = 0.0
    """OpenAI's: subtract this from the logit of every token already in the reply.
    In ``[-2, 2]``; ``0`` turns it off."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtract this times the token's count in the reply so far. In ``[-2, 2]``."""
    logit_bias: dict[int, float] | None = None
    """Token id -> a bias added to its logit, in ``[-100, 100]`` (-100 bans, 100 forces)."""
    max_new_tokens: int | None = None
    """Most tokens in the reply. ``None`` means :data:`DEFAULT_MAX_NEW_TOKENS`, unless
    ``max_length`` is given, which then alone limits the reply."""
    max_length: int | None = None
    """Most tokens in prompt + reply, as in Hugging Face. ``None`` means no such limit."""
    stop: tuple[str, ...] = field(default=())
    """Strings that end the reply (not included in it). A single string or a list is
    accepted and stored as a tuple."""
    seed: int | None = None
    """Seed for this reply's random draws; ``None`` draws a fresh one."""
    do_sample: bool | None = None
    """``None``: sample when ``temperature > 0``. ``False``: greedy whatever the
    temperature. ``True`` with temperature ``0`` is still greedy."""
    json_schema: dict[str, Any] | None = None
    """A JSON Schema every reply follows: only tokens that keep the reply valid JSON
    matching it are sampled, and the reply ends where the JSON does (see
    :mod:`~chatforge.generation.grammar`). ``{"type": "object"}``: any JSON object."""
    slide: bool = False
    """Keep generating when prompt + reply reach the model's context: the oldest tokens
    after a kept head (``keep``) are dropped and the window is computed again from
    scratch (exact: a fresh forward pass, positions from 0), so only ``max_new_tokens``
    (or ``max_length``) ends the reply. Off: the context also ends it
    (``finish_reason`` "length", ``Completion.context_full``)."""
    keep: int | None = None
    """With ``slide``: the tokens at the start of the window that are never dropped.
    ``None``: the rendered system prompt's tokens, when a chat has one (at most half the
    context), else none. Must be less than the model's context."""

    def __post_init__(self) -> None:
        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ParamError(
                "temperature", f"must be >= 0 (got {self.temperature}); use 0 for greedy decoding"
            )

        self.top_k = _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise ParamError("top_k", f"must be >= 0 (got {self.top_k}); use 0 to disable it")

        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError(
                "top_p", f"must be in (0, 1] (got {self.top_p}); use 1.0 to disable it"
            )

        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p < 1.0:
            raise ParamError("min_p", f"must be in [0, 1) (got {self.min_p}); use 0 to disable it")

        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ParamError(
                "repetition_penalty",
                f"must be > 0 (got {self.repetition_penalty}); 1.0 disables it",
            )

        self.no_repeat_ngram_size = _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size)
        if self.no_repeat_ngram_size < 0:
            raise ParamError(
                "no_repeat_ngram_size",
                f"must be >= 0 (got {self.no_repeat_ngram_size}); use 0 to disable it",
            )

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ParamError(name, f"must be in [-2, 2] (got {value}); 0 disables it")
            setattr(self, name, value)

        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ParamError(
                    "logit_bias", f"must map token ids to biases (got {self.logit_bias!r})"
                )
            bias: dict[int, float] = {}
            for tok, value in self.logit_bias.items():
                try:
                    tid = int(tok)
                except (TypeError, ValueError):
                    raise ParamError(
                        "logit_bias", f"keys must be token ids (got {tok!r})"
                    ) from None
                if isinstance(tok, bool) or tid < 0 or (isinstance(tok, float) and tok != tid):
                    raise ParamError("logit_bias", f"keys must be token ids (got {tok!r})")
                v = _check_bias(tid, value)
                bias[tid] = v
            self.logit_bias = bias or None

        for name in ("max_new_tokens", "max_length"):
            value = _check_int(name, getattr(self, name), optional=True)
            if value is not None and value < 1:
                raise ParamError(name, f"must be >= 1 (got {value}); use None for no limit")
            setattr(self, name, value)

        self.stop = _normalise_stop(self.stop)

        self.seed = _check_int("seed", self.seed, optional=True)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ParamError("seed", f"must be in [0, 2**64) (got {self.seed})")

        if self.json_schema is not None:
            json_schema_grammar(self.json_schema)  # fails here, naming json_schema

        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise ParamError("do_sample", f"must be True, False or None (got {self.do_sample!r})")

        if not isinstance(self.slide, bool):
            raise ParamError("slide", f"must be True or False (got {self.slide!r})")
        self.keep = _check_int("keep", self.keep, optional=True)
        if self.keep is not None and self.keep < 0:
            raise ParamError(
                "keep", f"must be >= 0 (got {self.keep}); use None for the system prompt"
            )

    # ------------------------------------------------------------------ derived

    @property
    def greedy(self) -> bool:
        """True when replies take the most likely token at every step."""
        return self.do_sample is False or self.temperature == 0.0

    def reply_budget(
        self, prompt_tokens: int, context_length: int | None = None, cap: int | None = None
    ) -> int:
        """Number of new tokens a reply to a ``prompt_tokens``-long prompt may have (>= 1;
        0 only for ``cap=0``, a prompt scored without a reply).

        The budget is ``max_new_tokens`` (or :data:`DEFAULT_MAX_NEW_TOKENS` when neither
        length is set), capped by ``max_length - prompt_tokens``, by ``context_length -
        prompt_tokens`` and by ``cap`` (a budget resolved earlier). Raises
        :class:`ContextOverflowError` when either cap leaves no room for even one token.
        With ``slide`` the context does not cap it (the prompt must still fit). This is
        :func:`chatforge.conversation.budget.reply_budget` with this config's lengths,
        the one rule every caller asks.
        """
        return reply_budget(
            prompt_tokens,
            context_length,
            max_new_tokens=self.max_new_tokens,
            max_length=self.max_length,
            cap=cap,
            slide=self.slide,
        )

    def context_caps_reply(
        self, prompt_tokens: int, context_length: int | None, cap: int | None = None
    ) -> bool:
        """True when the context (not this config's lengths or ``cap``) limits the reply
        :meth:`reply_budget` gives: a reply using it all stopped because the context was
        full. :func:`chatforge.conversation.budget.context_caps_reply`."""
        return context_caps_reply(
            prompt_tokens,
            context_length,
            max_new_tokens=self.max_new_tokens,
            max_length=self.max_length,
            cap=cap,
            slide=self.slide,
        )

    # ------------------------------------------------------------------ copies

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """The names of all settings, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def _check_names(cls, names: Any) -> None:
        valid = cls.param_names()
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise InputError(
                f"unknown generation parameter {unknown[0]!r}; valid names: {', '.join(valid)}"
            )

    def replace(self, **changes: Any) -> GenerationConfig:
        """A validated copy with ``changes`` applied."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes)

    def for_sample(self, j: int) -> GenerationConfig:
        """The settings of sample ``j`` of several drawn for one prompt (``n``): with a
        seed, sample ``j`` uses ``seed + j`` (mod 2**64), so each sample differs and a
        rerun reproduces them all; without one, every sample draws a fresh seed."""
        if self.seed is None or j == 0:
            return self
        return self.replace(seed=(self.seed + j) % 2**64)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (for transcripts and output files)."""
        out = dataclasses.asdict(self)
        out["stop"] = list(self.stop)
        return out

    @classmethod
    def default(cls, **overrides: Any) -> GenerationConfig:
        """The defaults of ``chatforge chat``/``generate`` and of every API whose config is
        optional: :data:`DEFAULT_PRESET` with ``overrides`` on top. The constructor's own
        defaults are neutral (temperature 1, no filters or penalties: OpenAI's semantics),
        see the class docstring."""
        return cls.from_preset(DEFAULT_PRESET, **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GenerationConfig:
        """A config from the preset ``name`` (see :data:`PRESETS`), with ``overrides`` on top.

        Overrides that are ``None`` are ignored, so CLI options that were not given
        can be passed straight through.
        """
        key = name.strip().lower() if isinstance(name, str) else name
        if key not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        cls._check_names(given)
        base = dict(PRESETS[key])
        if given.get("temperature") == 0:
            # An explicit greedy request means the model's own most likely tokens (what
            # transformers' greedy generate gives): the preset's penalties do not apply
            # unless given too.
            for name in GREEDY_DROPS:
                base.pop(name, None)
        return cls(**{**base, **given})

    def set_param(self, name: str, value: str) -> GenerationConfig:
        """A copy with one setting parsed from text, for the chat command ``/set NAME VALUE``.

        ``name`` may use dashes or underscores (``top-p``). ``none``/``off`` clears
        optional settings (``seed``, ``max_length``, ``max_new_tokens``, ``stop``) and
        turns filters off (``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
        ``no_repeat_ngram_size``). ``stop`` takes ``|``-separated strings and
        understands ``\\n`` and ``\\t``. ``do_sample`` takes true/false/auto; ``slide``
        on/off; ``keep`` a token count or ``none`` (the system prompt).
        """
        key = name.strip().lower().replace("-", "_")
        self._check_names([key])
        text = value.strip()
        word = text.lower()

        parsed: Any
        if word in _OFF_WORDS and key in _OFF_VALUES:
            parsed = _OFF_VALUES[key]
        elif key == "stop":
            parsed = tuple(_unescape(part) for part in value.split("|"))
        elif key == "logit_bias":  # "ID:BIAS,ID:BIAS"
            bias: dict[int, float] = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                tok, sep, val = part.partition(":")
                try:
                    bias[int(tok)] = float(val)
                except ValueError:
                    raise ParamError(
                        "logit_bias", f"takes ID:BIAS pairs separated by commas (got {part!r})"
                    ) from None
                if not sep:
                    raise ParamError("logit_bias", f"takes ID:BIAS pairs (got {part!r})")
            parsed = bias or None
        elif key == "json_schema":  # inline JSON, or a file holding it
            parsed = load_json_schema(text)
        elif key == "slide":
            if word in _TRUE_WORDS:
                parsed = True
            elif word in _FALSE_WORDS:
                parsed = False
            else:
                raise ParamError("slide", f"must be on or off (got {value!r})")
        elif key == "do_sample":
            if word in _TRUE_WORDS:
                parsed = True
            elif word in _FALSE_WORDS:
                parsed = False
            elif word == "auto":
                parsed = None
            else:
                raise ParamError("do_sample", f"must be true, false or auto (got {value!r})")
        elif key in _FLOAT_PARAMS:
            try:
                parsed = float(text)
            except ValueError:
                raise ParamError(key, f"must be a number (got {value!r})") from None
        elif key in _INT_PARAMS:
            try:
                parsed = int(text)
            except ValueError:
                hint = "; use 'none' to clear it" if _OFF_VALUES.get(key, 0) is None else ""
                raise ParamError(key, f"must be an integer (got {value!r}){hint}") from None
        else:  # pragma: no cover - every field is handled above
            raise InputError(f"cannot set {key} from text")
        return self.replace(**{key: parsed})
