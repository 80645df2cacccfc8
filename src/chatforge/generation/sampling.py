"""Sampling as pure functions over next-token logits ``(B, V)``.

Each function takes logits for a batch of ``B`` sequences over a vocabulary of
``V`` tokens and per-row settings as ``(B,)`` tensors, so one batch can mix
settings (a greedy request next to a creative one). A row whose setting is
"off" comes back bit-identical. Semantics match Hugging Face's logits
processors for a single row (``min_tokens_to_keep=1``).

Order, as in Hugging Face, litgpt and gpt-fast::

    logit bias -> presence/frequency -> repetition penalty -> no-repeat-ngram
                                    (penalties: also applied to greedy rows)
    -> temperature -> top-k -> top-p -> min-p   (warpers: sampled rows only)
    -> sample (inverse CDF, one uniform per row from its own generator) or argmax (greedy rows)

The logit bias and the presence/frequency penalties are OpenAI's (``logit_bias``,
``presence_penalty``, ``frequency_penalty``: the latter two count the reply's
tokens only); the repetition penalty and n-gram blocking are Hugging Face's (the
prompt counts too). The engine runs a request's logits processors (a grammar)
before all of these, and reads logprobs from the raw logits before that.

Filtered tokens get ``-inf``; every filter keeps at least the most likely
token, so a row never runs out of candidates. Probabilities are computed in
float32 even for bf16 logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from chatforge.generation.config import GenerationConfig

NEG_INF = float("-inf")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from OS randomness when ``seed`` is None."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()  # non-deterministic seed, independent of the global RNG
    else:
        gen.manual_seed(seed)
    return gen


@dataclass
class SamplingParams:
    """Per-row settings for one batch, as tensors on the logits' device.

    Float settings are float64 so that thresholds derived from them (``1 - top_p``)
    round exactly like Hugging Face's Python floats; they are cast to float32
    before touching the logits. Greedy rows carry neutral warper settings.
    """

    temperature: Tensor
    """(B,) float; 0 for greedy rows."""
    top_k: Tensor
    """(B,) long; 0 = off."""
    top_p: Tensor
    """(B,) float; 1 = off."""
    min_p: Tensor
    """(B,) float; 0 = off."""
    repetition_penalty: Tensor
    """(B,) float; 1 = off."""
    presence_penalty: Tensor
    """(B,) float; 0 = off. Subtracted once from every token already in the reply."""
    frequency_penalty: Tensor
    """(B,) float; 0 = off. Subtracted per occurrence of a token in the reply."""
    logit_bias_ids: Tensor
    """(B, K) long: the tokens each row biases, padded with -1 (K = 0: no bias anywhere)."""
    logit_bias_values: Tensor
    """(B, K) float: the bias added to each of those tokens' logits."""
    no_repeat_ngram_size: list[int]
    """Per row; 0 = off. A list because banning runs per row on the CPU."""
    greedy: Tensor
    """(B,) bool; True rows take the argmax of the penalised logits."""

    def __post_init__(self) -> None:
        sizes = {
            t.shape[0]
            for t in (
                self.temperature,
                self.top_k,
                self.top_p,
                self.min_p,
                self.repetition_penalty,
                self.presence_penalty,
                self.frequency_penalty,
                self.logit_bias_ids,
                self.logit_bias_values,
                self.greedy,
            )
        }
        sizes.add(len(self.no_repeat_ngram_size))
        if len(sizes) != 1:
            raise ValueError(f"SamplingParams fields disagree on the batch size: {sorted(sizes)}")

    @property
    def batch_size(self) -> int:
        """Number of rows ``B``."""
        return len(self.no_repeat_ngram_size)

    @classmethod
    def from_configs(
        cls, configs: Sequence[GenerationConfig], device: torch.device | str | None = None
    ) -> SamplingParams:
        """Stack one :class:`GenerationConfig` per row into batch tensors on ``device``."""
        if len(configs) == 0:
            raise ValueError("SamplingParams.from_configs needs at least one config")
        greedy = [c.greedy for c in configs]

        def floats(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float64, device=device)

        bias_ids, bias_values = pack_logit_bias([c.logit_bias or {} for c in configs], device)

        return cls(
            # Greedy rows get neutral warpers: they only use the penalised logits.
            temperature=floats(
                [0.0 if g else c.temperature for c, g in zip(configs, greedy, strict=True)]
            ),
            # top_k beyond the vocabulary means "off" either way; clamp so any int fits.
            top_k=torch.tensor(
                [0 if g else min(c.top_k, 2**31) for c, g in zip(configs, greedy, strict=True)],
                dtype=torch.long,
                device=device,
            ),
            top_p=floats([1.0 if g else c.top_p for c, g in zip(configs, greedy, strict=True)]),
            min_p=floats([0.0 if g else c.min_p for c, g in zip(configs, greedy, strict=True)]),
            repetition_penalty=floats([c.repetition_penalty for c in configs]),
            presence_penalty=floats([c.presence_penalty for c in configs]),
            frequency_penalty=floats([c.frequency_penalty for c in configs]),
            logit_bias_ids=bias_ids.to(device),
            logit_bias_values=bias_values.to(device),
            no_repeat_ngram_size=[c.no_repeat_ngram_size for c in configs],
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        )


# ---------------------------------------------------------------------- penalties


def pack_logit_bias(
    biases: Sequence[Mapping[int, float]], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """One ``logit_bias`` mapping per row as :func:`apply_logit_bias` takes them: (B, K)
    long ids padded with -1, and (B, K) float64 values (K: the longest mapping)."""
    width = max((len(b) for b in biases), default=0)
    ids = torch.full((len(biases), width), -1, dtype=torch.long, device=device)
    values = torch.zeros((len(biases), width), dtype=torch.float64, device=device)
    for row, bias in enumerate(biases):
        if bias:
            ids[row, : len(bias)] = torch.tensor(list(bias), dtype=torch.long)
            values[row, : len(bias)] = torch.tensor(list(bias.values()), dtype=torch.float64)
    return ids, values


def apply_logit_bias(logits: Tensor, ids: Tensor, values: Tensor) -> Tensor:
    """Add ``values[i, j]`` to ``logits[i, ids[i, j]]``: OpenAI's ``logit_bias`` (-100
    bans a token, 100 forces it), every row in one operation.

    logits: (B, V); ids: (B, K) long, -1 (or any id outside ``[0, V)``) = padding;
    values: (B, K). Rows without a bias come back bit-identical.
    """
    if ids.numel() == 0:
        return logits
    vocab = logits.shape[-1]
    ids = ids.to(device=logits.device, dtype=torch.long)
    valid = (ids >= 0) & (ids < vocab)  # (B, K)
    active = valid.any(dim=-1)  # (B,)
    if not bool(active.any()):
        return logits
    # Padding goes to a spare column that is dropped afterwards.
    cols = ids.masked_fill(~valid, vocab)
    vals = values.to(device=logits.device, dtype=logits.dtype).masked_fill(~valid, 0.0)
    bias = logits.new_zeros(logits.shape[0], vocab + 1).scatter_add_(1, cols, vals)  # (B, V + 1)
    return torch.where(active[:, None], logits + bias[:, :vocab], logits)


def apply_presence_frequency_penalty(
    logits: Tensor,
    replies: Sequence[Sequence[int] | Tensor],
    presence: Tensor,
    frequency: Tensor,
) -> Tensor:
    """OpenAI's penalties: ``logit - frequency * count - presence * (count > 0)``, where
    ``count`` is how often the token occurs in the row's reply so far (the prompt is
    not counted).

    logits: (B, V); replies: per row, the generated token ids; presence, frequency:
    (B,), 0 = off. Rows with both off come back bit-identical.
    """
    p = presence.to(device=logits.device, dtype=logits.dtype)  # (B,)
    f = frequency.to(device=logits.device, dtype=logits.dtype)  # (B,)
    active = (p != 0) | (f != 0)
    if not bool(active.any()):
        return logits
    batch, vocab = logits.shape
    if len(replies) != batch:
        raise ValueError(f"got {len(replies)} replies for {batch} rows")
    ids = _padded_from(replies, logits.device)  # (B, L), -1 padded
    invalid = (ids < 0) | (ids >= vocab)
    ones = (~invalid).to(logits.dtype)
    counts = logits.new_zeros(batch, vocab + 1)  # (B, V + 1), the spare column for padding
    counts.scatter_add_(1, ids.masked_fill(invalid, vocab), ones)
    counts = counts[:, :vocab]  # (B, V) occurrences of each token in each reply
    penalised = logits - f[:, None] * counts - p[:, None] * (counts > 0).to(logits.dtype)
    return torch.where(active[:, None], penalised, logits)


def apply_repetition_penalty(
    logits: Tensor, history: Tensor, history_mask: Tensor | None, penalty: Tensor
) -> Tensor:
    """Penalise tokens already seen: positive logits / penalty, negative logits * penalty.

    logits: (B, V); history: (B, L) token ids (prompt + generated); history_mask: (B, L)
    bool, False at padding (None = no padding); penalty: (B,), 1 = off. Ids outside
    ``[0, V)`` are ignored, as in Hugging Face.
    """
    active = penalty != 1.0  # (B,)
    if history.numel() == 0 or not bool(active.any()):
        return logits
    vocab = logits.shape[-1]
    ids = history.to(device=logits.device, dtype=torch.long)  # (B, L)
    invalid = (ids < 0) | (ids >= vocab)
    if history_mask is not None:
        invalid |= ~history_mask.to(device=logits.device, dtype=torch.bool)
    # Padding and out-of-vocab ids go to a spare column that is dropped afterwards.
    ids = ids.masked_fill(invalid, vocab)
    padded = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1)
    seen = padded.gather(1, ids).float()  # (B, L)
    p = penalty.to(device=logits.device, dtype=torch.float32)[:, None]  # (B, 1)
    seen = torch.where(seen < 0, seen * p, seen / p).to(logits.dtype)
    penalised = padded.scatter(1, ids, seen)[:, :vocab]  # (B, V)
    return torch.where(active[:, None], penalised, logits)


def _ngram_bans(history: Tensor, size: int) -> Tensor:
    """Tokens that would complete an n-gram of ``size`` already in ``history`` (L,)."""
    length = history.numel()
    if size == 0 or length < size:
        return history.new_empty(0)
    prefix = history[length - size + 1 :]  # (size - 1,) the n-gram the next token would end
    windows = history.unfold(0, size, 1)  # (L - size + 1, size)
    matches = (windows[:, :-1] == prefix).all(dim=-1)  # (L - size + 1,)
    return windows[matches, -1]


def apply_no_repeat_ngram(
    logits: Tensor, histories: Sequence[Sequence[int] | Tensor], sizes: Sequence[int]
) -> Tensor:
    """Set to -inf every token that would repeat an n-gram of ``sizes[i]`` in row ``i``.

    logits: (B, V); histories: per row, the token ids so far (prompt + generated, no
    padding); sizes: per row, 0 = off.
    """
    batch, vocab = logits.shape
    if len(histories) != batch or len(sizes) != batch:
        raise ValueError(
            f"apply_no_repeat_ngram got {len(histories)} histories and {len(sizes)} sizes "
            f"for {batch} rows"
        )
    if not any(sizes):
        return logits
    banned = torch.zeros(batch, vocab, dtype=torch.bool)  # (B, V), built on the CPU
    for row, (hist, size) in enumerate(zip(histories, sizes, strict=True)):
        if size <= 0:
            continue
        ids = _ngram_bans(torch.as_tensor(hist, dtype=torch.long).cpu().reshape(-1), size)
        ids = ids[(ids >= 0) & (ids < vocab)]
        banned[row, ids] = True
    return logits.masked_fill(banned.to(logits.device), NEG_INF)


# ---------------------------------------------------------------------- warpers


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide each row by its temperature. Rows with temperature 0 (greedy) are untouched.

    logits: (B, V); temperature: (B,).
    """
    t = temperature.to(device=logits.device, dtype=torch.float32)  # (B,)
    active = (t > 0) & (t != 1.0)
    if not bool(active.any()):
        return logits
    divisor = torch.where(active, t, torch.ones_like(t))[:, None]  # (B, 1)
    scaled = (logits.float() / divisor).to(logits.dtype)
    return torch.where(active[:, None], scaled, logits)


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep each row's ``top_k`` highest logits (ties with the k-th kept); 0 = off.

    logits: (B, V); top_k: (B,) long.
    """
    vocab = logits.shape[-1]
    k = top_k.to(device=logits.device, dtype=torch.long).clamp(max=vocab)  # (B,)
    active = k > 0
    if not bool(active.any()):
        return logits
    k_max = int(k.max())
    top = torch.topk(logits, k_max, dim=-1).values  # (B, k_max), descending
    kth = top.gather(1, (k.clamp(min=1) - 1)[:, None])  # (B, 1) the k-th largest logit
    remove = (logits < kth) & active[:, None]
    return logits.masked_fill(remove, NEG_INF)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filter: keep the most likely tokens whose probability sums to ``top_p``.

    logits: (B, V); top_p: (B,), 1 = off. The most likely token is always kept.
    """
    p = top_p.to(device=logits.device)
    active = p < 1.0  # (B,)
    if not bool(active.any()):
        return logits
    scores = logits.float()  # (B, V)
    # Like HF: 1 - top_p in double precision, then compared in float32.
    threshold = (1.0 - p.double()).to(torch.float32)[:, None]  # (B, 1)
    if scores.shape[-1] > 4 * _NUCLEUS_K:
        remove, decided = _top_p_from_top_k(scores, threshold, active)
        rest = active & ~decided  # rows the top tokens could not decide: sorted below
        if bool(rest.any()):
            rows = rest.nonzero()[:, 0]
            remove[rows] = _top_p_sorted(scores[rows], threshold[rows])
        return logits.masked_fill(remove, NEG_INF)
    return logits.masked_fill(_top_p_sorted(scores, threshold) & active[:, None], NEG_INF)


def _top_p_sorted(scores: Tensor, threshold: Tensor) -> Tensor:
    """HF's top-p, exactly: the (B, V) mask of tokens to remove, by sorting each row.
    scores: (B, V) float32; threshold: (B, 1) float32."""
    vocab = scores.shape[-1]
    candidates = max(1, int(torch.isfinite(scores).sum(dim=-1).max()))
    if candidates * 4 <= vocab:
        # Few finite logits (top-k ran first): sort only those. The -inf rest has
        # probability 0 and would sit at the start of the ascending order adding 0
        # to the cumulative sum, so the kept set is the same as with a full sort.
        top_logits, top_idx = torch.topk(scores, candidates, dim=-1)  # (B, C) descending
        sorted_logits, sorted_idx = top_logits.flip(-1), top_idx.flip(-1)  # ascending
    else:
        sorted_logits, sorted_idx = torch.sort(scores, dim=-1, descending=False)  # (B, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # ascending
    remove_sorted = cumulative <= threshold
    remove_sorted[:, -1] = False  # keep the most likely token
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, sorted_idx, remove_sorted)


_NUCLEUS_K = 256  # most likely tokens looked at before sorting a whole row
_NUCLEUS_MARGIN = 1e-4  # probability mass a kept/removed decision must clear to be certain


def _top_p_from_top_k(scores: Tensor, threshold: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """The tokens :func:`apply_top_p` removes, found among the ``_NUCLEUS_K`` most likely
    tokens instead of by sorting the whole vocabulary (~5 ms a row of 49k): ``(remove,
    decided)``, (B, V) and (B,) bool; a row not ``decided`` that way (its ``remove`` row
    is meaningless) is sorted by the caller, exactly as before.

    HF's rule, written from the most likely token down: the token of rank r is kept iff
    the probability of the tokens more likely than it, S_r, is below 1 - threshold. S_r is
    summed here in another order than HF's ascending cumulative sum (both in double, from
    float32 probabilities within an ulp of each other), so a row is decided here only
    when every S_r of its top K clears the limit by ``_NUCLEUS_MARGIN`` (errors are ~1e-7),
    the nucleus ends inside the top K, and no two tokens of equal logit straddle its end
    (HF's sort could order them either way). Peaked rows (chat's presets) always qualify.

    scores: (B, V) float32; threshold: (B, 1) float32; active: (B,) bool.
    """
    k = _NUCLEUS_K
    top_logits, top_idx = torch.topk(scores, k, dim=-1)  # (B, K) descending, as HF's order
    probs = scores.softmax(dim=-1).gather(1, top_idx).double()  # (B, K)
    before = probs.cumsum(dim=-1) - probs  # (B, K) S_r: mass more likely than rank r
    limit = 1.0 - threshold.double()  # (B, 1)
    keep = before < limit  # (B, K) a prefix of True
    keep[:, 0] = True  # the most likely token always stays
    n_keep = keep.sum(dim=-1, keepdim=True)  # (B, 1) >= 1
    clear = ((before - limit).abs() > _NUCLEUS_MARGIN)[:, 1:].all(dim=-1)  # (B,)
    inside = n_keep[:, 0] < k  # the first removed token is in the top K too
    last = top_logits.gather(1, n_keep - 1)  # (B, 1) least likely kept
    first_out = top_logits.gather(1, n_keep.clamp(max=k - 1))  # (B, 1) most likely removed
    decided = clear & inside & (last[:, 0] != first_out[:, 0])
    remove = torch.ones_like(scores, dtype=torch.bool)
    remove.scatter_(1, top_idx, ~keep)  # kept top-K tokens: False; everything else: True
    return remove & active[:, None], decided


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens less likely than ``min_p`` times the row's most likely token; 0 = off.

    logits: (B, V); min_p: (B,).
    """
    m = min_p.to(device=logits.device, dtype=torch.float32)  # (B,)
    active = m > 0
    if not bool(active.any()):
        return logits
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    top = probs.amax(dim=-1, keepdim=True)  # (B, 1)
    remove = probs < m[:, None] * top
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)  # keep at least one
    return logits.masked_fill(remove & active[:, None], NEG_INF)


# ---------------------------------------------------------------------- pipeline


def _padded_from(histories: Sequence[Sequence[int] | Tensor], device: torch.device) -> Tensor:
    """A (B, L) history padded with -1 (ignored by the repetition penalty)."""
    rows = [torch.as_tensor(h, dtype=torch.long).reshape(-1).cpu() for h in histories]
    length = max((r.numel() for r in rows), default=0)
    out = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out.to(device)


def apply_penalties(
    logits: Tensor,
    params: SamplingParams,
    histories: Sequence[Sequence[int] | Tensor],
    replies: Sequence[Sequence[int] | Tensor] | None = None,
) -> Tensor:
    """Logit bias, presence/frequency penalties, repetition penalty, n-gram blocking, in
    that order. ``histories``: per row, the ids so far (prompt + reply); ``replies``:
    per row, the reply's ids only (None: no reply yet), for OpenAI's penalties."""
    batch = logits.shape[0]
    if params.batch_size != batch:
        raise ValueError(f"params are for {params.batch_size} rows but logits have {batch}")
    logits = apply_logit_bias(logits, params.logit_bias_ids, params.logit_bias_values)
    if bool(((params.presence_penalty != 0) | (params.frequency_penalty != 0)).any()):
        replies = replies if replies is not None else [[] for _ in range(batch)]
        logits = apply_presence_frequency_penalty(
            logits, replies, params.presence_penalty, params.frequency_penalty
        )
    if bool((params.repetition_penalty != 1.0).any()):
        history = _padded_from(histories, logits.device)
        logits = apply_repetition_penalty(logits, history, None, params.repetition_penalty)
    if any(params.no_repeat_ngram_size):
        logits = apply_no_repeat_ngram(logits, histories, params.no_repeat_ngram_size)
    return logits


def apply_warpers(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, top-k, top-p, min-p, in that order."""
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def takes_argmax(configs: Sequence[GenerationConfig]) -> bool:
    """True when :func:`sample` gives every row the argmax of its logits as they are:
    greedy, and no bias, penalty or n-gram block changes them. The caller may then
    skip building :class:`SamplingParams` (a dozen small tensors a decode step)."""
    return all(
        c.greedy
        and c.repetition_penalty == 1.0
        and c.presence_penalty == 0.0
        and c.frequency_penalty == 0.0
        and not c.logit_bias
        and not c.no_repeat_ngram_size
        for c in configs
    )


def sample(
    logits: Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator | None],
    histories: Sequence[Sequence[int] | Tensor] | None = None,
    replies: Sequence[Sequence[int] | Tensor] | None = None,
) -> Tensor:
    """Pick the next token of every row: (B, V) raw logits -> (B,) long.

    Greedy rows take the argmax of the penalised logits; the others draw from the
    processed distribution with one uniform from their own generator (``None`` = the
    global RNG), so a seeded row draws the same tokens whatever else is in the batch.
    A token with probability 0 is never returned. ``histories``: per row, the ids so
    far (prompt + generated), for the repetition penalties; ``replies``: per row, the
    generated ids only, for the presence/frequency penalties.
    """
    batch = logits.shape[0]
    if len(generators) != batch:
        raise ValueError(f"sample got {len(generators)} generators for {batch} rows")
    if histories is None:
        histories = [[] for _ in range(batch)]
    penalised = apply_penalties(logits, params, histories, replies)  # (B, V)
    dead = torch.isneginf(penalised).all(dim=-1)  # (B,) rows with every token banned
    if bool(dead.any()):
        row = int(dead.nonzero()[0])
        raise ValueError(
            f"every token is banned for sequence {row} "
            f"(no_repeat_ngram_size={params.no_repeat_ngram_size[row]}); "
            "lower no_repeat_ngram_size or set it to 0"
        )
    tokens = penalised.argmax(dim=-1)  # (B,) right for greedy rows
    sampled_rows = (~params.greedy).nonzero().flatten().tolist()
    if not sampled_rows:
        return tokens
    probs = torch.softmax(apply_warpers(penalised, params).float(), dim=-1)  # (B, V) float32
    # One uniform per sampled row from that row's own generator: a seeded row's draws
    # do not depend on what else is in the batch.
    uniforms = torch.cat(
        [torch.rand(1, dtype=torch.float64, generator=generators[row]) for row in sampled_rows]
    ).to(probs.device)  # (S,)
    index = torch.tensor(sampled_rows, dtype=torch.long, device=tokens.device)  # (S,)
    draws = _inverse_cdf(probs.index_select(0, index), uniforms)  # (S,)
    return tokens.index_copy(0, index, draws)


def _inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Draw one token per row from ``probs`` (S, V) using ``uniforms`` (S,) in [0, 1).

    Equivalent in distribution to ``torch.multinomial(probs, 1)`` but one vectorised
    cumsum + binary search instead of V random numbers per row. The first index whose
    cumulative probability exceeds the target is taken; a zero-probability token has
    the same cumulative value as the token before it, so it is never the first.
    """
    cdf = probs.double().cumsum(dim=-1)  # (S, V), non-decreasing
    target = (uniforms.double() * cdf[:, -1])[:, None]  # (S, 1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)  # (S,) first cdf > target
    # Rounding can put the target at the very top: fall back to the last possible token.
    vocab = probs.shape[-1]
    last_possible = vocab - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)  # (S,)
    return torch.minimum(picked, last_possible)
