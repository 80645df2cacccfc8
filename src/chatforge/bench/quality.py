"""The quality check of quantised weights: perplexity on a chitchat sample.

Each setting's fast decoder scores the same conversations (rendered in the
model's prompt format); perplexity is over the assistant tokens, as
``chatforge eval`` reports it. A setting passes when its perplexity is within
the allowed share of fp32's (int8: 2 %, int4: 8 %, a GGUF's own blocks: 2 %). For a
model converted from a GGUF, fp32 is that file's weights expanded exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

ALLOWED = {"none": 0.02, "int8": 0.02, "int4": 0.08, "gguf": 0.02}  # bf16 weights: as int8
SETTINGS = (
    ("fp32", "none"),
    ("fp32", "gguf"),  # a GGUF model's own Q4 blocks (skipped for other models)
    ("bf16", "none"),
    ("fp32", "int8"),
    ("bf16", "int8"),
    ("fp32", "int4"),
    ("bf16", "int4"),
)


def chitchat_sample(loaded: Any, conversations: int = 40, max_tokens: int = 512):
    """(ids, assistant mask) pairs for the first chitchat conversations that have replies."""
    from chatforge.training.data import load_chitchat

    max_tokens = min(max_tokens, loaded.info.context_length)
    out = []
    for conv in load_chitchat()[: conversations * 2]:
        ids, _, mask = loaded.format.encode_for_training(conv)
        ids, mask = ids[:max_tokens], mask[:max_tokens]
        if any(mask[1:]):
            out.append((ids, mask))
        if len(out) == conversations:
            break
    return out


def perplexity(decoder: Any, sample: list[tuple[list[int], list[bool]]]) -> float:
    """exp(mean negative log-likelihood) of the assistant tokens, scored by the engine
    (prompt logprobs from one prefill: the kernels that serve requests)."""
    from chatforge.generation.engine import Engine, EngineConfig
    from chatforge.generation.fast_runner import FastRunner

    engine = Engine(
        FastRunner(decoder),
        None,
        set(),
        decoder.cfg.max_positions,
        decoder.cfg.vocab_size,
        EngineConfig(prefix_cache=False),
    )
    nll, count = 0.0, 0
    for ids, mask in sample:
        scored = engine.score(ids)
        for lp, keep in zip(scored[1:], mask[1:], strict=True):
            if keep:
                nll -= lp.logprob
                count += 1
    return math.exp(nll / max(count, 1))


def quality_check(loaded: Any, settings=SETTINGS, conversations: int = 40) -> list[dict]:
    """Perplexity per (activation dtype, weights) setting; fp32 dense weights are the reference."""
    from chatforge.models.fast import build_fast_model

    sample = chitchat_sample(loaded, conversations)
    rows: list[dict] = []
    base = None
    gguf = _gguf_weights(loaded)
    for dtype, q in settings:
        if q == "gguf" and gguf is None:
            continue
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        decoder = build_fast_model(loaded.model, torch_dtype, q, gguf=gguf)
        ppl = perplexity(decoder, sample)
        if base is None:
            base = ppl
        change = (ppl - base) / base
        allowed = 0.0 if (dtype, q) == ("fp32", "none") else ALLOWED[q]
        rows.append(
            {
                "dtype": dtype,
                "quantize": q,
                "perplexity": ppl,
                "change": change,
                "allowed": allowed,
                "passes": change <= allowed,
                "tokens": sum(sum(m[1:]) for _, m in sample),
            }
        )
    return rows


def _gguf_weights(loaded: Any) -> Any:
    """The quantised blocks of the GGUF ``loaded`` was converted from (None if it was not)."""
    from chatforge.models.fast.gguf_weights import source_gguf_weights
    from chatforge.models.meta import ModelMeta

    return source_gguf_weights(ModelMeta.read(loaded.info.path), loaded.model.config.model_type)
