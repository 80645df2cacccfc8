"""Sampling functions: parity with Hugging Face's logits processors, mixed batches, seeding."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chatforge.generation.config import GenerationConfig
from chatforge.generation.sampling import (
    SamplingParams,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_warpers,
    make_generator,
    sample,
    takes_argmax,
)

B, V = 4, 300


def _logits(seed: int = 0, batch: int = B, vocab: int = V) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=gen) * 3  # (B, V)


def _ids(seed: int = 0, batch: int = B, length: int = 24, high: int = V) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, high, (batch, length), generator=gen)  # (B, L)


def _full(value: float, batch: int = B, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.full((batch,), value, dtype=dtype)


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("seed", range(3))
def test_parity_with_transformers(seed: int) -> None:
    x, ids = _logits(seed), _ids(seed)
    for t in (0.3, 0.7, 1.5):
        assert torch.equal(apply_temperature(x, _full(t)), TemperatureLogitsWarper(t)(ids, x))
    for k in (1, 5, 50, V + 10):
        assert torch.equal(apply_top_k(x, _full(k, dtype=torch.long)), TopKLogitsWarper(k)(ids, x))
    for p in (0.1, 0.5, 0.9, 0.95):
        assert torch.equal(apply_top_p(x, _full(p)), TopPLogitsWarper(p)(ids, x))
    for m in (0.01, 0.05, 0.3, 0.9):
        assert torch.equal(apply_min_p(x, _full(m)), MinPLogitsWarper(m)(ids, x))
    for r in (0.7, 1.1, 1.3):
        expected = RepetitionPenaltyLogitsProcessor(r)(ids, x.clone())
        assert torch.equal(apply_repetition_penalty(x, ids, None, _full(r)), expected)
    small = _ids(seed, length=40, high=6)  # few distinct ids, so n-grams repeat
    for n in (1, 2, 3):
        expected = NoRepeatNGramLogitsProcessor(n)(small, x.clone())
        assert torch.equal(apply_no_repeat_ngram(x, small.tolist(), [n] * B), expected)


def test_top_k_then_top_p_matches_transformers() -> None:
    # After top-k most logits are -inf and top-p sorts only the survivors.
    x, ids = _logits(3, vocab=2000), _ids(3)
    for k, p in ((5, 0.5), (40, 0.9), (200, 0.95), (1, 0.3)):
        ours = apply_top_p(apply_top_k(x, _full(k, dtype=torch.long)), _full(p))
        theirs = TopPLogitsWarper(p)(ids, TopKLogitsWarper(k)(ids, x))
        assert torch.equal(ours, theirs), (k, p)


def test_mixed_rows_match_transformers_row_by_row_and_off_rows_are_untouched() -> None:
    x, ids = _logits(5), _ids(5)
    temps = [0.0, 0.5, 1.0, 2.0]
    out = apply_temperature(x, torch.tensor(temps, dtype=torch.float64))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    for i in (1, 3):
        assert torch.equal(
            out[i], TemperatureLogitsWarper(temps[i])(ids[i : i + 1], x[i : i + 1])[0]
        )

    cases = [
        (apply_top_k, [0, 3, 40, 0], TopKLogitsWarper, torch.long, 0),
        (apply_top_p, [1.0, 0.5, 0.9, 1.0], TopPLogitsWarper, torch.float64, 1.0),
        (apply_min_p, [0.0, 0.1, 0.02, 0.0], MinPLogitsWarper, torch.float64, 0.0),
        (
            lambda lg, s: apply_repetition_penalty(lg, ids, None, s),
            [1.0, 1.2, 0.8, 1.0],
            RepetitionPenaltyLogitsProcessor,
            torch.float64,
            1.0,
        ),
    ]
    for fn, values, hf_cls, dtype, off in cases:
        out = fn(x, torch.tensor(values, dtype=dtype))
        for i, v in enumerate(values):
            if v == off:
                assert torch.equal(out[i], x[i]), (hf_cls, i)
            else:
                expected = hf_cls(v)(ids[i : i + 1], x[i : i + 1].clone())[0]
                assert torch.equal(out[i], expected), (hf_cls, i)

    small = _ids(5, length=30, high=5)
    sizes = [0, 2, 0, 3]
    out = apply_no_repeat_ngram(x, small.tolist(), sizes)
    for i, n in enumerate(sizes):
        if n == 0:
            assert torch.equal(out[i], x[i])
        else:
            expected = NoRepeatNGramLogitsProcessor(n)(small[i : i + 1], x[i : i + 1].clone())[0]
            assert torch.equal(out[i], expected)


def test_repetition_penalty_ignores_padding() -> None:
    x = _logits(7, batch=2)
    ids = _ids(7, batch=2, length=10)
    padded = torch.cat([ids, torch.full((2, 5), 17)], dim=1)  # (2, 15); 17 is padding
    mask = torch.cat([torch.ones(2, 10, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool)], 1)
    out = apply_repetition_penalty(x, padded, mask, _full(1.3, batch=2))
    assert torch.equal(out, RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone()))
    # Ids outside the vocabulary (e.g. -1 padding) are ignored rather than crashing.
    with_neg = torch.cat([ids, torch.full((2, 3), -1)], dim=1)
    assert torch.equal(apply_repetition_penalty(x, with_neg, None, _full(1.3, batch=2)), out)


def test_bf16_logits_keep_their_dtype() -> None:
    x = _logits(8).to(torch.bfloat16)
    params = SamplingParams.from_configs(
        [GenerationConfig.from_preset("creative", top_k=20, no_repeat_ngram_size=2)] * B
    )
    out = apply_warpers(apply_penalties(x, params, _ids(8).tolist()), params)
    assert out.dtype == torch.bfloat16 and out.shape == (B, V)
    assert torch.isfinite(out).any(dim=-1).all()


# ---------------------------------------------------------------- filters never empty a row


def test_filters_always_keep_a_candidate() -> None:
    x = _logits(9)
    x[0] = 0.0  # all ties
    x[1, :] = -1e4
    x[1, 7] = 50.0  # one dominant token
    assert (apply_top_k(x, _full(1, dtype=torch.long)) > float("-inf")).sum(-1).min() >= 1
    assert (apply_top_p(x, _full(1e-9)) > float("-inf")).sum(-1).min() >= 1
    assert (apply_min_p(x, _full(0.999)) > float("-inf")).sum(-1).min() >= 1
    # The argmax always survives, so the greedy choice is never filtered out.
    both = apply_min_p(
        apply_top_p(apply_top_k(x, _full(2, dtype=torch.long)), _full(0.01)), _full(0.9)
    )
    assert torch.equal(both.argmax(-1)[1:], x.argmax(-1)[1:])
    assert both[1, 7] == 50.0


# ---------------------------------------------------------------- SamplingParams


def test_params_from_configs_and_select() -> None:
    configs = [
        GenerationConfig(temperature=0.0, top_k=5, repetition_penalty=1.2),
        GenerationConfig(temperature=0.9, top_k=5, top_p=0.8, min_p=0.1, no_repeat_ngram_size=3),
        GenerationConfig(temperature=0.9, do_sample=False),
    ]
    params = SamplingParams.from_configs(configs)
    assert params.greedy.tolist() == [True, False, True]
    # Greedy rows keep their penalties but get neutral warpers.
    assert params.temperature.tolist() == [0.0, 0.9, 0.0]
    assert params.top_k.tolist() == [0, 5, 0]
    assert params.top_p.tolist() == [1.0, 0.8, 1.0]
    assert params.min_p.tolist() == [0.0, 0.1, 0.0]
    assert params.repetition_penalty.tolist() == [1.2, 1.0, 1.0]
    assert params.no_repeat_ngram_size == [0, 3, 0]
    with pytest.raises(ValueError):
        SamplingParams.from_configs([])


# ---------------------------------------------------------------- sample()


def test_greedy_rows_take_the_argmax_of_the_penalised_logits() -> None:
    x, ids = _logits(11), _ids(11)
    configs = [GenerationConfig(temperature=0.0)] * 2 + [
        GenerationConfig(temperature=0.0, repetition_penalty=5.0)
    ] * 2
    params = SamplingParams.from_configs(configs)
    out = sample(x, params, [None] * B, histories=ids.tolist())
    assert out.dtype == torch.long and out.shape == (B,)
    assert out[:2].tolist() == x[:2].argmax(-1).tolist()
    penalised = RepetitionPenaltyLogitsProcessor(5.0)(ids[2:], x[2:].clone())
    assert out[2:].tolist() == penalised.argmax(-1).tolist()


def test_same_seed_same_draws_and_independent_of_batch_composition() -> None:
    x = _logits(12, batch=3)
    cfg = GenerationConfig(temperature=1.5, top_k=100)
    params = SamplingParams.from_configs([cfg] * 3)
    draws = []
    for _ in range(2):
        gens = [make_generator(s) for s in (1, 2, 3)]
        draws.append(torch.stack([sample(x, params, gens) for _ in range(20)]))  # (20, 3)
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0][:, 0], draws[0][:, 1])  # different seeds differ

    # Row 1 alone (seed 2) draws exactly what it drew inside the batch of three,
    # and so does it inside a different batch with other settings around it.
    alone_gen = [make_generator(2)]
    one = SamplingParams.from_configs([cfg])
    alone = torch.stack([sample(x[1:2], one, alone_gen)[0] for _ in range(20)])
    assert torch.equal(alone, draws[0][:, 1])
    other = SamplingParams.from_configs([GenerationConfig(temperature=0.0), cfg])
    mixed_gens = [None, make_generator(2)]
    mixed_x = torch.stack([_logits(99, batch=1)[0], x[1]])
    mixed = torch.stack([sample(mixed_x, other, mixed_gens)[1] for _ in range(20)])
    assert torch.equal(mixed, draws[0][:, 1])


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    x = probs.log().repeat(2, 1)  # (2, 5), zero-probability tokens are -inf
    params = SamplingParams.from_configs([GenerationConfig(temperature=1.0)] * 2)
    gens = [make_generator(0), make_generator(1)]
    counts = torch.zeros(5)
    for _ in range(1000):
        counts += torch.bincount(sample(x, params, gens), minlength=5)
    freq = counts / counts.sum()
    assert counts[1] == 0 and counts[4] == 0  # probability 0 is never drawn
    assert torch.allclose(freq, probs, atol=0.03)


def test_unseeded_generators_differ() -> None:
    a, b = make_generator(None), make_generator(None)
    assert torch.rand(4, generator=a).tolist() != torch.rand(4, generator=b).tolist()
    assert torch.equal(
        torch.rand(4, generator=make_generator(5)), torch.rand(4, generator=make_generator(5))
    )


def test_filtered_and_banned_tokens_are_never_sampled() -> None:
    vocab = 12
    x = torch.zeros(2, vocab)  # uniform, so every allowed token is likely to come up
    history = [[1, 2, 3, 1, 2], [4, 5, 4]]
    cfg = GenerationConfig(temperature=1.0, no_repeat_ngram_size=3)
    params = SamplingParams.from_configs([cfg, cfg.replace(no_repeat_ngram_size=2)])
    gens = [make_generator(0), make_generator(1)]
    seen: list[set[int]] = [set(), set()]
    for _ in range(300):
        tok = sample(x, params, gens, histories=history)
        seen[0].add(int(tok[0]))
        seen[1].add(int(tok[1]))
    assert 3 not in seen[0]  # "1 2 3" exists, so after "1 2" the 3 is banned
    assert 5 not in seen[1]  # "4 5" exists, so after "4" the 5 is banned
    assert len(seen[0]) == vocab - 1 and len(seen[1]) == vocab - 1

    top_k_params = SamplingParams.from_configs([GenerationConfig(temperature=1.0, top_k=3)])
    y = _logits(13, batch=1, vocab=50)
    allowed = set(y[0].topk(3).indices.tolist())
    gen = [make_generator(4)]
    drawn = {int(sample(y, top_k_params, gen)[0]) for _ in range(200)}
    assert drawn <= allowed


def test_penalties_from_histories_of_different_lengths() -> None:
    x = _logits(14, batch=2, vocab=10)
    lists = [[1, 2, 3, 1, 2], [4, 5, 4]]
    cfg = GenerationConfig(temperature=0.8, repetition_penalty=1.3, no_repeat_ngram_size=2)
    both = apply_penalties(x, SamplingParams.from_configs([cfg] * 2), lists)
    # Each row is penalised by its own history only, whatever the other row holds.
    alone = apply_penalties(x[1:], SamplingParams.from_configs([cfg]), lists[1:])
    assert torch.equal(alone[0], both[1])
    assert both[1, 5] == float("-inf")  # banned by the 2-gram "4 5"


def test_every_token_banned_is_a_clear_error() -> None:
    params = SamplingParams.from_configs([GenerationConfig(no_repeat_ngram_size=1)])
    with pytest.raises(ValueError, match="every token is banned.*no_repeat_ngram_size"):
        sample(torch.zeros(1, 3), params, [None], histories=[[0, 1, 2]])


def test_generator_count_must_match() -> None:
    params = SamplingParams.from_configs([GenerationConfig()] * 2)
    with pytest.raises(ValueError, match="generators"):
        sample(torch.zeros(2, 5), params, [None])


def test_top_p_decides_peaked_rows_from_the_top_tokens_exactly_as_transformers() -> None:
    """A real vocabulary (49k): peaked rows (chat's temperatures) are decided from the 256
    most likely tokens without a sort; flat rows fall back to the sort. Both equal
    transformers' TopPLogitsWarper bit for bit."""
    import chatforge.generation.sampling as sampling

    gen = torch.Generator().manual_seed(7)
    seen_fast = seen_sorted = 0
    for t in (0.2, 0.3, 0.9, 3.0):
        x = torch.randn(6, 49152, generator=gen) * 3 / t
        for p in (0.5, 0.9, 0.95):
            top_p = _full(p, batch=6)
            threshold = (1.0 - top_p).to(torch.float32)[:, None]
            active = torch.ones(6, dtype=torch.bool)
            fast = bool(sampling._top_p_from_top_k(x, threshold, active)[1].all())
            seen_fast, seen_sorted = seen_fast + fast, seen_sorted + (not fast)
            assert torch.equal(apply_top_p(x, top_p), TopPLogitsWarper(p)(None, x.clone()))
    assert seen_fast and seen_sorted  # both ways were taken


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"repetition_penalty": 1.3},
        {"presence_penalty": 0.5},
        {"frequency_penalty": -0.5},
        {"logit_bias": {3: 5.0}},
        {"no_repeat_ngram_size": 2},
    ],
)
def test_takes_argmax_only_where_sample_gives_the_raw_argmax(change):
    """The engine's shortcut (argmax without building SamplingParams) is taken for
    plain greedy rows only; on those it is what sample() returns."""
    greedy = GenerationConfig(temperature=0)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    histories = [[1, 2, 3, 1, 2], [4, 4], [7]]
    assert takes_argmax([greedy, greedy.replace(max_new_tokens=3)])
    got = sample(logits, SamplingParams.from_configs([greedy] * 3), [None] * 3, histories)
    assert got.tolist() == logits.argmax(-1).tolist()
    other = greedy.replace(**change)
    assert not takes_argmax([greedy, other])
