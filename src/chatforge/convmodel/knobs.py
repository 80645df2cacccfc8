"""transformers' ``generate`` knobs -> :class:`GenerationConfig` (the one place they map).

``ConversationModel.generate(context, do_sample=True, top_p=0.95, top_k=50)`` means what
it means to ``transformers``: greedy unless ``do_sample=True``; when sampling, ``top_k``
is 50 unless given (transformers' default), the temperature 1. Differences, on purpose:

* neither ``max_new_tokens`` nor ``max_length`` given: the reply may have
  ``DEFAULT_MAX_NEW_TOKENS`` (256) tokens and ends at the format's stop token
  (transformers' ``max_length=20`` counts the prompt too and rarely leaves a reply);
* ``seed`` seeds this call's draws (sample ``j`` of ``num_return_sequences`` uses
  ``seed + j``: distinct samples, the same ones on every run);
* sampling knobs given without ``do_sample=True`` do nothing, as in transformers, and a
  ``UserWarning`` names them.

A knob that is not listed here is an error naming it, never ignored.
"""

from __future__ import annotations

import warnings
from typing import Any

from chatforge.errors import ParamError
from chatforge.generation.config import GenerationConfig

TRANSFORMERS_KNOBS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "max_new_tokens",
    "max_length",
    "num_return_sequences",
    "stop_strings",
    "num_beams",
)
"""transformers' names (``num_beams`` only as 1: the engine does not search beams)."""
CHATFORGE_KNOBS = (
    "seed",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stop",
    "json_schema",
)
"""chatforge's own :class:`GenerationConfig` settings, also accepted."""
KNOBS = TRANSFORMERS_KNOBS + CHATFORGE_KNOBS
TRANSFORMERS_TOP_K = 50
"""transformers' ``top_k`` when sampling and none is given."""
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")


def generation_settings(knobs: dict[str, Any]) -> tuple[GenerationConfig, int]:
    """``(config, num_return_sequences)`` for transformers-style ``knobs``; see the module doc."""
    unknown = [k for k in knobs if k not in KNOBS]
    if unknown:
        raise ParamError(
            unknown[0],
            f"is not a generation knob of ConversationModel.generate; use one of "
            f"{', '.join(KNOBS)}",
        )
    fields = dict(knobs)
    n = fields.pop("num_return_sequences", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParamError("num_return_sequences", f"must be an integer >= 1 (got {n!r})")
    beams = fields.pop("num_beams", 1)
    if beams != 1:
        raise ParamError(
            "num_beams", f"must be 1 (got {beams!r}): chatforge's engine has no beam search"
        )
    if "stop_strings" in fields:
        if "stop" in fields:
            raise ParamError("stop_strings", ": give stop_strings or stop, not both")
        fields["stop"] = fields.pop("stop_strings")
    do_sample = fields.pop("do_sample", False)
    if not isinstance(do_sample, bool):
        raise ParamError("do_sample", f"must be True or False (got {do_sample!r})")
    if do_sample:
        fields.setdefault("top_k", TRANSFORMERS_TOP_K)
    else:
        idle = [k for k in _SAMPLING_ONLY if k in fields]
        if idle:
            warnings.warn(
                f"do_sample is False (transformers' default: greedy), so {', '.join(idle)} "
                "has no effect; pass do_sample=True to sample",
                UserWarning,
                stacklevel=3,
            )
    config = GenerationConfig(do_sample=do_sample, **fields)
    if n > 1 and config.greedy:
        raise ParamError(
            "num_return_sequences",
            f"must be 1 with greedy decoding, which gives one reply (got {n}); "
            "pass do_sample=True (with a temperature > 0) to draw several",
        )
    return config, n
