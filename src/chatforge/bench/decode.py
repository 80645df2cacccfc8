"""Decode-speed measurements of one engine setting, on one model.

Each setting is measured in its own process (``python -m chatforge.bench.worker``)
so peak memory is its own and no setting warms the caches of another. All
settings see the same prompts: a ~500-token prompt for prefill and time to
first token, a short chat prompt for decoding at batch 1, and 8 / 32 different
short prompts decoded together. End-of-sequence is ignored so every setting
produces the same number of tokens.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

LONG_TEXT = (
    "The history of the lighthouse keeper's family is long and full of storms. "
    "Every winter the sea rose over the rocks, the lamp was trimmed at dusk, and the "
    "logbook recorded ships, wind, fog and the names of those who came ashore. "
)
SHORT_PROMPTS = [
    "Tell me a story about a dragon.",
    "What is the capital of France?",
    "Write a poem about the sea.",
    "How do I bake bread?",
    "Why is the sky blue?",
    "Describe your favourite place.",
    "What should I cook tonight?",
    "Explain gravity to a child.",
]


@dataclass
class BenchSetting:
    """One engine configuration to measure."""

    engine: str  # "transformers" | "chatforge" | "llama.cpp"
    dtype: str = "fp32"  # "fp32" | "bf16"
    quantize: str = "none"  # "none" | "int8" | "int4"
    threads: int | None = None  # torch threads (None: torch's default)


@dataclass
class BenchResult:
    """Numbers for one setting at one batch size (``decode_tok_s`` is the batch total)."""

    engine: str
    dtype: str
    quantize: str
    batch: int
    prefill_tok_s: float | None
    ttft_ms: float | None
    decode_tok_s: float
    peak_rss_mb: float
    threads: int
    kernels: str | None = None  # chatforge's CPU kernels (native.kernel_path()); None: not ours


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def _kernel_path() -> str:
    from chatforge.models.fast import native

    return native.kernel_path()


def _prompts(loaded: Any, n: int) -> list[list[int]]:
    from chatforge.conversation import Message

    texts = [SHORT_PROMPTS[i % len(SHORT_PROMPTS)] + f" ({i})" for i in range(n)]
    return [loaded.format.encode([Message("user", t)]).input_ids for t in texts]


def _long_prompt(loaded: Any, tokens: int = 500) -> list[int]:
    from chatforge.conversation import Message

    text = LONG_TEXT * 20
    ids = loaded.format.encode([Message("user", text)]).input_ids
    while len(ids) > tokens:
        text = text[: int(len(text) * 0.95)]
        ids = loaded.format.encode([Message("user", text)]).input_ids
    return ids


def measure(
    setting: BenchSetting,
    model_ref: str,
    new_tokens: int = 128,
    batch_tokens: int = 64,
    batches: tuple[int, ...] = (1, 8, 32),
) -> list[BenchResult]:
    """Measure one setting; returns a result per batch size."""
    if setting.threads:
        torch.set_num_threads(setting.threads)
    from chatforge.models import load_model

    fast = setting.engine == "chatforge"
    loaded = load_model(model_ref, dtype=setting.dtype, quantize=setting.quantize, fast=fast)
    run = _ChatforgeRun(loaded) if fast else _TransformersRun(loaded)
    long_ids = _long_prompt(loaded, min(500, loaded.info.context_length // 2))
    run.generate([long_ids[:64]], 4)  # warm-up: first calls allocate and tune kernels
    t0 = time.perf_counter()
    run.prefill(long_ids)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run.generate([long_ids], 1)
    ttft = time.perf_counter() - t0
    results = []
    for b in batches:
        prompts = _prompts(loaded, b)
        n = new_tokens if b == 1 else batch_tokens
        rate = decode_rate(b, n, run.generate(prompts, n))
        results.append(
            BenchResult(
                engine=setting.engine,
                dtype=setting.dtype,
                quantize=setting.quantize,
                batch=b,
                prefill_tok_s=len(long_ids) / prefill_s if b == 1 else None,
                ttft_ms=ttft * 1000 if b == 1 else None,
                decode_tok_s=rate,
                peak_rss_mb=_peak_rss_mb(),
                threads=torch.get_num_threads(),
                kernels=_kernel_path() if fast else None,
            )
        )
    return results


def decode_rate(batch: int, n: int, stamps: list[float]) -> float:
    """Tokens per second of the last ``n - 1`` steps of a run that decoded ``n`` tokens for
    each of ``batch`` sequences; ``stamps``: the clock after each of its steps (the first
    token's step and any before it, the prompts' prefill, are left out).

    Timing the steps of one run, not a 1-token run subtracted from an n-token one: on a
    busy machine (or a tiny model) that difference could be <= 0 (no figure) or
    near 0 (1.3e11 tok/s)."""
    if n < 2 or len(stamps) < n or stamps[-1] <= stamps[-n]:
        return float("nan")
    return batch * (n - 1) / (stamps[-1] - stamps[-n])


class _ChatforgeRun:
    def __init__(self, loaded: Any) -> None:
        from chatforge.generation.engine import Engine, EngineConfig

        # No prefix cache: every measurement computes its prompts, as transformers does.
        # Threads pinned to torch's count (not the busy-machine policy), so a setting's
        # figure does not depend on what else ran on the machine meanwhile.
        cfg = EngineConfig(prefix_cache=False, threads=torch.get_num_threads())
        self.engine = Engine.from_loaded(loaded, cfg)
        self.engine.stop_token_ids = set()  # same token count for every setting

    def prefill(self, ids: list[int]) -> None:
        from chatforge.generation.types import Request

        self.engine.generate([Request(ids, max_new_tokens=0)])  # the prompt only

    def generate(self, prompts: list[list[int]], n: int) -> list[float]:
        """Greedy ``n`` tokens for each prompt, all in one batch; the clock after each step."""
        from chatforge.generation.config import GenerationConfig
        from chatforge.generation.types import Request

        cfg = GenerationConfig(temperature=0, max_new_tokens=n)
        for p in prompts:
            self.engine.add(Request(p, cfg), on_event=lambda ev: None)
        stamps = []
        while self.engine.has_work:
            self.engine.step(max_batch=len(prompts))
            stamps.append(time.perf_counter())
        return stamps


class _TransformersRun:
    """transformers' own ``generate`` (greedy, KV cache, left padding for batches)."""

    def __init__(self, loaded: Any) -> None:
        self.model = loaded.model
        tok = loaded.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int) -> list[float]:
        """Greedy ``n`` tokens for each prompt; the clock after each forward pass (a logits
        processor, which leaves the scores alone, is called once a step)."""
        from transformers import LogitsProcessorList

        stamps: list[float] = []

        def stamp(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return scores

        t = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), t), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, t - len(p) :] = torch.tensor(p)
            mask[i, t - len(p) :] = 1
        self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=self.pad,
            logits_processor=LogitsProcessorList([stamp]),
        )
        return stamps


def result_dicts(results: list[BenchResult]) -> list[dict]:
    return [asdict(r) for r in results]


def measure_llama_cpp(gguf_path: str, new_tokens: int = 128, threads: int | None = None):
    """llama.cpp (llama-cpp-python) on the GGUF file itself, batch 1; None if not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import os

    n_threads = threads or os.cpu_count() or 2
    llm = Llama(model_path=gguf_path, n_ctx=2048, n_threads=n_threads, verbose=False)
    long_ids = llm.tokenize((LONG_TEXT * 20).encode())[:500]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long_ids)
    prefill = time.perf_counter() - t0
    llm.reset()
    prompt = llm.tokenize(SHORT_PROMPTS[0].encode())
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    decode = time.perf_counter() - t0
    return [
        BenchResult(
            engine="llama.cpp",
            dtype="gguf",
            quantize="q4_1",
            batch=1,
            prefill_tok_s=len(long_ids) / prefill,
            ttft_ms=prefill * 1000,
            decode_tok_s=new_tokens / decode,
            peak_rss_mb=_peak_rss_mb(),
            threads=n_threads,
        )
    ]
