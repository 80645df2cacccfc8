"""Measure conversation models: held-out perplexity and what their replies look like.

* **perplexity**: ``exp`` of the mean next-token loss on the assistant turns of
  held-out conversations (rendered with each model's own prompt format), or on
  every token of a held-out text corpus (:func:`evaluate_text`: texts joined by EOS
  and cut into context-length chunks, as training reads a corpus);
* **distinct-1 / distinct-2**: unique word unigrams / bigrams over all
  generated replies, divided by their total (low = the model repeats itself
  across replies, the classic "i don't know" failure);
* **repeated n-gram rate**: the share of word 3-grams in a reply that already
  occurred earlier in the same reply (high = loops), averaged over replies;
* **mean reply length** in tokens.

Replies are generated with chatforge's :class:`~chatforge.Engine` for the last
assistant turn of each held-out conversation, greedily (or sampled with a seed);
for a text corpus, they continue the first half of its lines as plain text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from chatforge.conversation.messages import Message
from chatforge.training.examples import (
    IGNORE,
    build_examples,
    collate,
    loss_sum,
    model_inputs,
    pack,
    packing_isolates,
    to_device,
)

NGRAM = 3  # n of the repeated n-gram rate


@dataclass
class EvalResult:
    """One model's scores on one dataset."""

    model: str
    perplexity: float | None
    loss: float | None
    eval_tokens: int  # tokens the perplexity is computed over (assistant tokens; text: all)
    conversations: int  # held-out conversations (a text corpus: texts)
    distinct_1: float | None
    distinct_2: float | None
    repeated_ngram_rate: float | None
    mean_reply_tokens: float | None
    replies: int
    seconds: float
    samples: list[dict]  # a few (prompt, reply) pairs to eyeball

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(loaded: Any, conversations: Sequence[list[Message]], batch_size: int = 8):
    """``(loss, tokens)``: mean next-token loss over assistant tokens of ``conversations``.

    Scored by the model's engine where it has a fast path (the decoder that
    serves requests; transformers' released copy is not loaded again), else by
    transformers' model on packed rows.
    """
    from chatforge.training.data import Dataset

    return _score(loaded, Dataset("convmodel", list(conversations)), batch_size)


def text_perplexity(loaded: Any, texts: Sequence[str], batch_size: int = 8):
    """``(loss, tokens)``: mean next-token loss over every token of ``texts`` (joined by
    EOS, cut into context-length chunks, as training reads a text corpus)."""
    from chatforge.training.data import Dataset

    return _score(loaded, Dataset("text", texts=list(texts)), batch_size)


@torch.no_grad()
def _score(loaded: Any, dataset: Any, batch_size: int):
    context = min(loaded.info.context_length, 1024)
    examples, _ = build_examples(loaded.format, dataset, context, "assistant")
    if not examples:
        return None, 0
    total, n = 0.0, 0
    if getattr(loaded, "fast", None) is not None:
        from chatforge.errors import ChatforgeError
        from chatforge.generation.engine import Engine, Request

        # One scoring request per example: examples never see each other, as the
        # packed rows' block mask guarantees below.
        requests = [
            Request(list(ex.ids), token_type_ids=ex.types, max_new_tokens=0, prompt_logprobs=0)
            for ex in examples
        ]
        scored = Engine.shared(loaded).generate(requests, max_batch=batch_size)
        for ex, c in zip(examples, scored, strict=True):
            if c.finish_reason == "error" or c.prompt_logprobs is None:
                raise ChatforgeError(f"scoring failed: {c.error}")
            # Entry t: token t given the ones before it (entry 0: None); the mask
            # marks learned tokens, as the packed route's targets do.
            for lp, keep in zip(c.prompt_logprobs[1:], ex.mask[1:], strict=True):
                if keep:
                    total -= lp.logprob
                    n += 1
        return total / max(1, n), n
    model = loaded.model
    isolated = packing_isolates(model, len(loaded.tokenizer), loaded.info.prompt_format == "sep")
    rows = pack(examples, context, enabled=isolated)
    dev = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = to_device(collate(rows[i : i + batch_size], 0), dev)
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        total += float(loss_sum(logits, batch["targets"]))
        n += int((batch["targets"] != IGNORE).sum())
    return total / max(1, n), n


def reply_prompts(conversations: Sequence[list[Message]]) -> list[list[Message]]:
    """Each conversation up to (not including) its last assistant turn."""
    out = []
    for conv in conversations:
        last = max((i for i, m in enumerate(conv) if m.role == "assistant"), default=0)
        if last > 0:
            out.append(list(conv[:last]))
    return out


def generate_replies(
    loaded: Any,
    prompts: Sequence[list[Message]],
    max_new_tokens: int = 48,
    seed: int | None = None,
    batch_size: int = 8,
    fmt: Any = None,
) -> list[Any]:
    """Completions (the model's engine) for each prompt, rendered in ``fmt`` (None: the
    model's format); old turns dropped to fit the context."""
    from chatforge.conversation import BudgetConfig
    from chatforge.generation.config import GenerationConfig
    from chatforge.generation.engine import Engine
    from chatforge.generation.plan import plan_request

    if seed is None:
        cfg = GenerationConfig(temperature=0, max_new_tokens=max_new_tokens)
    else:
        cfg = GenerationConfig(temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens, seed=seed)
    engine = Engine.shared(loaded)
    requests = []
    for msgs in prompts:
        if msgs[-1].role != "user":  # a reply to whatever came last: treat it as the user's
            msgs = [*msgs[:-1], Message("user", msgs[-1].content)]
        plan = plan_request(
            fmt or loaded.format,
            msgs,
            loaded.info.context_length,
            cfg,
            budget=BudgetConfig(min_reply_tokens=min(16, max_new_tokens)),
        )
        requests.append(plan.request)
    return engine.generate(requests, max_batch=batch_size)


def reply_stats(texts: Sequence[str]) -> dict[str, float | None]:
    """distinct-1, distinct-2 and the repeated n-gram rate of reply texts."""
    words = [t.lower().split() for t in texts]
    uni = [w for ws in words for w in ws]
    bi = [tuple(ws[i : i + 2]) for ws in words for i in range(len(ws) - 1)]
    rates = []
    for ws in words:
        grams = [tuple(ws[i : i + NGRAM]) for i in range(len(ws) - NGRAM + 1)]
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return {
        "distinct_1": len(set(uni)) / len(uni) if uni else None,
        "distinct_2": len(set(bi)) / len(bi) if bi else None,
        "repeated_ngram_rate": sum(rates) / len(rates) if rates else 0.0,
    }


def evaluate(
    loaded: Any,
    conversations: Sequence[list[Message]],
    name: str | None = None,
    replies: int = 32,
    max_new_tokens: int = 48,
    seed: int | None = None,
) -> EvalResult:
    """Perplexity on all ``conversations``; reply metrics on the first ``replies`` of them."""
    t0 = time.perf_counter()
    loss, n = perplexity(loaded, conversations)
    prompts = reply_prompts(conversations)[:replies]
    return _result(
        loaded, name, t0, loss, n, len(conversations), prompts, None, max_new_tokens, seed
    )


def text_prompts(texts: Sequence[str], limit: int) -> list[list[Message]]:
    """The first half (in words) of each line of ``texts`` that has two words or more,
    as one-message prompts, at most ``limit``."""
    out: list[list[Message]] = []
    for text in texts:
        for line in text.splitlines():
            words = line.split()
            if len(out) < limit and len(words) >= 2:
                out.append([Message("user", " ".join(words[: len(words) // 2]))])
    return out


def evaluate_text(
    loaded: Any,
    texts: Sequence[str],
    name: str | None = None,
    replies: int = 32,
    max_new_tokens: int = 48,
    seed: int | None = None,
) -> EvalResult:
    """Perplexity on every token of ``texts`` (a held-out corpus); reply metrics on plain
    text continuations (the text format, whatever the model's) of the first half of
    ``replies`` of its lines."""
    from chatforge.conversation.formats import TextFormat

    t0 = time.perf_counter()
    loss, n = text_perplexity(loaded, texts)
    fmt = loaded.format if isinstance(loaded.format, TextFormat) else TextFormat(loaded.tokenizer)
    prompts = text_prompts(texts, replies)
    return _result(loaded, name, t0, loss, n, len(texts), prompts, fmt, max_new_tokens, seed)


def _result(
    loaded: Any,
    name: str | None,
    t0: float,
    loss: float | None,
    n: int,
    items: int,
    prompts: list[list[Message]],
    fmt: Any,
    max_new_tokens: int,
    seed: int | None,
) -> EvalResult:
    """The scores, with reply metrics over completions of ``prompts`` (none: no replies)."""
    stats: dict[str, float | None] = {
        "distinct_1": None,
        "distinct_2": None,
        "repeated_ngram_rate": None,
    }
    mean_len, samples, done = None, [], 0
    if prompts:
        comps = generate_replies(loaded, prompts, max_new_tokens, seed, fmt=fmt)
        stats = reply_stats([c.text for c in comps])
        mean_len = sum(c.completion_tokens for c in comps) / len(comps) if comps else None
        done = len(comps)
        samples = [
            {"prompt": p[-1].content, "reply": c.text} for p, c in zip(prompts, comps, strict=True)
        ][:3]
    return EvalResult(
        model=name or loaded.info.name,
        perplexity=math.exp(min(loss, 50)) if loss is not None else None,
        loss=loss,
        eval_tokens=n,
        conversations=items,
        distinct_1=stats["distinct_1"],
        distinct_2=stats["distinct_2"],
        repeated_ngram_rate=stats["repeated_ngram_rate"],
        mean_reply_tokens=mean_len,
        replies=done,
        seconds=time.perf_counter() - t0,
        samples=samples,
    )
