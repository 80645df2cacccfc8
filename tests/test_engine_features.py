"""What the persistent engine gives users: prefix reuse, logprobs, logits processors,
faults confined to one request, batch-invariant greedy output."""

from __future__ import annotations

import pytest
import torch

from chatforge import ChatSession, GenerationConfig, Message, Request, load_model
from chatforge.generation.engine import Engine, EngineConfig
from chatforge.generation.processors import LogitBias, LogitsProcessor

GREEDY = GenerationConfig(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tiny_llama_dir, tiny_gpt2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    return load_model(str(path), dtype="fp32", quantize="none")


def _engine(lm, fast=None, **config) -> Engine:
    eng = Engine.from_loaded(lm, EngineConfig(**config), fast=fast)
    eng.stop_token_ids = set()  # random weights: fixed-length outputs
    return eng


def _ids(lm, text: str) -> list[int]:
    return lm.format.encode([Message("user", text)]).input_ids


# ------------------------------------------------------------------ prefix cache


def test_a_chat_reuses_its_history_and_says_so(lm):
    eng = _engine(lm)
    chat = ChatSession(lm, GenerationConfig(temperature=0, max_new_tokens=20), engine=eng)
    chat.send("Hello there, tell me about the sea and the ships on it")
    first = chat.last
    second = chat.send("And the lighthouse?")
    assert first.cached_tokens == 0
    # Everything but the last partial block of turn 1 (prompt + reply) is reused.
    bs = eng.runner.block_size
    assert second.cached_tokens >= (first.prompt_tokens + first.completion_tokens) // bs * bs - bs
    assert second.cached_tokens > 0 and second.cached_tokens % bs == 0
    # The same conversation without the cache gives the same tokens.
    cold = ChatSession(
        lm,
        GenerationConfig(temperature=0, max_new_tokens=20),
        engine=_engine(lm, prefix_cache=False),
    )
    cold.send("Hello there, tell me about the sea and the ships on it")
    assert cold.send("And the lighthouse?").text == second.text
    assert cold.last.cached_tokens == 0


def test_n_samples_of_one_prompt_compute_it_once(lm):
    eng = _engine(lm)
    prompt = _ids(lm, "Describe the harbour at dawn, the boats, the gulls and the fog " * 2)
    assert len(prompt) > 3 * eng.runner.block_size
    cfg = GenerationConfig(temperature=0.9, max_new_tokens=6)
    out = eng.generate([Request(prompt, cfg.replace(seed=s)) for s in range(4)])
    bs = eng.runner.block_size
    reusable = (len(prompt) - 1) // bs * bs
    assert [c.cached_tokens for c in out] == [0, reusable, reusable, reusable]
    cold = _engine(lm, prefix_cache=False)
    alone = [cold.generate([Request(prompt, cfg.replace(seed=s))])[0] for s in range(4)]
    assert [c.token_ids for c in out] == [c.token_ids for c in alone]


def test_eviction_keeps_the_cache_within_its_budget(lm):
    eng = _engine(lm)
    eng.blocks.max_blocks = 8  # a tiny budget: old prefixes must be evicted
    for i in range(6):
        c = eng.generate([Request(_ids(lm, f"Story number {i} about dragons"), GREEDY)])[0]
        assert c.finish_reason == "length"
    assert eng.blocks.n_blocks <= 8
    assert eng.cache_stats()["blocks_used"] == 0  # nothing running holds a block


# ------------------------------------------------------------------ logprobs


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "transformers"])
def test_logprobs_equal_transformers_log_softmax(lm, fast):
    eng = _engine(lm, fast=fast)
    ids = _ids(lm, "What is the capital of France? Tell me a story")
    scored = eng.score(ids, top=3)
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    assert scored[0] is None
    for i in range(1, len(ids)):
        assert abs(scored[i].logprob - float(ref[i - 1, ids[i]])) < 1e-3
        assert [t for t, _ in scored[i].top] == ref[i - 1].topk(3).indices.tolist()
    c = eng.generate([Request(ids, GREEDY, logprobs=2)])[0]
    full = ids + c.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(torch.tensor([full])).logits[0].float(), -1)
    for j, lp in enumerate(c.logprobs):
        row = ref[len(ids) - 1 + j]
        assert lp.token_id == c.token_ids[j]
        assert abs(lp.logprob - float(row[lp.token_id])) < 1e-3
        assert abs(lp.top[0][1] - float(row.max())) < 1e-3


def test_logprobs_are_of_the_model_not_of_the_sampling_settings(lm):
    eng = _engine(lm)
    ids = _ids(lm, "Hello there")
    hot = GenerationConfig(temperature=1.7, top_k=3, max_new_tokens=5, seed=1)
    c = eng.generate([Request(ids, hot, logprobs=0)])[0]
    scored = eng.score(ids + c.token_ids)
    for j, lp in enumerate(c.logprobs):
        assert abs(lp.logprob - scored[len(ids) + j].logprob) < 1e-4


def test_long_prompts_are_scored_across_prefill_chunks(lm):
    ids = _ids(lm, "the quick brown fox jumps over the lazy dog " * 3)
    assert 40 < len(ids) <= lm.info.context_length
    whole = _engine(lm).score(ids)
    chunked = _engine(lm, prefill_tokens=7).score(ids)
    assert len(whole) == len(chunked) == len(ids)
    assert [x.logprob for x in whole[1:]] == [x.logprob for x in chunked[1:]]


# ------------------------------------------------------------------ logits processors


class CountingBias(LogitBias):
    calls = 0

    @classmethod
    def process(cls, procs, views, logits):
        cls.calls += 1
        return super().process(procs, views, logits)


def test_logit_bias_is_one_vectorised_call_per_step_and_only_for_its_rows(lm):
    eng = _engine(lm)
    a, b = _ids(lm, "Hello there"), _ids(lm, "Thanks")
    alone_b = eng.generate([Request(b, GREEDY)])[0].token_ids
    forced = 7
    CountingBias.calls = 0
    reqs = [
        Request(a, GREEDY, processors=[CountingBias({forced: 100.0})]),
        Request(_ids(lm, "I dreamed"), GREEDY, processors=[CountingBias({forced: 100.0})]),
        Request(b, GREEDY),
    ]
    out = eng.generate(reqs)
    assert out[0].token_ids == [forced] * 12 == out[1].token_ids
    assert out[2].token_ids == alone_b  # a neighbour's processor does not leak
    assert CountingBias.calls == 12  # both biased rows in one call per step
    banned = alone_b[0]
    c = eng.generate([Request(b, GREEDY, processors=[LogitBias({banned: -100.0})])])[0]
    assert c.token_ids[0] != banned
    with pytest.raises(ValueError, match="logit_bias names token"):
        eng.add(Request(b, GREEDY, processors=[LogitBias({10**7: 1.0})]))
    with pytest.raises(ValueError, match="context is 128 tokens"):
        eng.score(list(range(1, 200)))


# ------------------------------------------------------------------ faults


class Explodes(LogitsProcessor):
    def __init__(self, after: int) -> None:
        self.after = after

    def process_row(self, view, logits):
        if len(view.generated_ids) >= self.after:
            raise RuntimeError("grammar state broke")
        return logits


def test_a_failing_request_ends_alone_and_the_others_go_on(lm):
    eng = _engine(lm)
    texts = ["Hello there", "Thanks", "I dreamed of the sea"]
    alone = [eng.generate([Request(_ids(lm, t), GREEDY)])[0].token_ids for t in texts]
    reqs = [Request(_ids(lm, t), GREEDY) for t in texts]
    reqs[1].processors = [Explodes(after=3)]
    out = eng.generate(reqs)
    assert out[1].finish_reason == "error" and "grammar state broke" in out[1].error
    assert out[1].completion_tokens == 3
    assert [out[0].token_ids, out[2].token_ids] == [alone[0], alone[2]]
    assert not eng.has_work and eng.cache_stats()["blocks_used"] == 0
    # The engine keeps serving.
    assert eng.generate([Request(_ids(lm, "Thanks"), GREEDY)])[0].token_ids == alone[1]


def test_a_forward_failure_is_retried_per_sequence_and_fails_only_the_culprit(lm):
    eng = _engine(lm)
    texts = ["Hello there", "Thanks", "I dreamed of the sea"]
    alone = [eng.generate([Request(_ids(lm, t), GREEDY)])[0].token_ids for t in texts]
    poison = _ids(lm, "poison pill")
    run = eng.runner.run

    def flaky(work):
        if any(w.seq.tokens[: len(poison)] == poison for w in work):
            raise MemoryError("out of memory in the forward kernel")
        return run(work)

    eng.runner.run = flaky
    out = eng.generate([Request(_ids(lm, texts[0]), GREEDY), Request(poison, GREEDY)])
    out += eng.generate([Request(_ids(lm, t), GREEDY) for t in texts[1:]])
    assert out[1].finish_reason == "error" and "MemoryError" in out[1].error
    assert [out[0].token_ids, out[2].token_ids, out[3].token_ids] == alone


def test_huge_top_k_and_seed_work(lm):
    eng = _engine(lm)
    cfg = GenerationConfig(temperature=0.8, top_k=2**63 - 1, seed=2**64 - 1, max_new_tokens=4)
    c = eng.generate([Request(_ids(lm, "Hello"), cfg)])[0]
    assert c.finish_reason == "length" and c.completion_tokens == 4


# ------------------------------------------------------------------ batch invariance


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_greedy_is_the_same_alone_and_in_a_crowd(tiny_llama_dir, quantize):
    lm = load_model(str(tiny_llama_dir), dtype="fp32", quantize=quantize)
    if not lm.fast.native:
        pytest.skip("no C compiler: the torch path is not batch-invariant")
    prompts = [_ids(lm, f"Client {i} asks about {'the sea ' * (i % 5)}") for i in range(32)]
    cfg = GenerationConfig(temperature=0, max_new_tokens=10)
    alone = [_engine(lm).generate([Request(p, cfg)])[0].token_ids for p in prompts]
    crowd = _engine(lm).generate([Request(p, cfg) for p in prompts])
    assert [c.token_ids for c in crowd] == alone


# ------------------------------------------------------------------ OpenAI's penalties and bias


def test_presence_and_frequency_penalties_follow_openais_definition():
    from chatforge.generation.sampling import SamplingParams, apply_penalties

    logits = torch.randn(2, 10)
    params = SamplingParams.from_configs(
        [
            GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25),
            GenerationConfig(presence_penalty=1.0, frequency_penalty=1.0),
        ]
    )
    # Row 0: prompt [1, 2], reply [3, 3, 5]; row 1: prompt [3], no reply yet.
    out = apply_penalties(logits, params, [[1, 2, 3, 3, 5], [3]], replies=[[3, 3, 5], []])
    expected = logits.clone()
    expected[0, 3] -= 0.25 * 2 + 0.5  # counted twice in the reply
    expected[0, 5] -= 0.25 * 1 + 0.5
    assert torch.allclose(out, expected)  # the prompt's tokens are not counted; row 1 untouched


def test_a_configs_logit_bias_is_one_vectorised_call_per_step_and_only_for_its_rows(
    lm, monkeypatch
):
    from chatforge.generation import sampling

    calls = []
    real = sampling.apply_logit_bias

    def counting(logits, ids, values):
        calls.append(logits.shape[0])
        return real(logits, ids, values)

    monkeypatch.setattr(sampling, "apply_logit_bias", counting)
    eng = _engine(lm)
    a, b = _ids(lm, "Hello there"), _ids(lm, "Thanks")
    alone_b = eng.generate([Request(b, GREEDY)])[0].token_ids
    forced = 7
    biased = GREEDY.replace(logit_bias={forced: 100.0})
    calls.clear()
    out = eng.generate(
        [Request(a, biased), Request(_ids(lm, "I dreamed"), biased), Request(b, GREEDY)]
    )
    assert out[0].token_ids == [forced] * 12 == out[1].token_ids
    assert out[2].token_ids == alone_b  # a neighbour's bias does not leak
    assert calls == [3] * 12  # all rows in one call per step


def test_generation_config_bias_and_penalties_reach_the_engine(lm):
    eng = _engine(lm)
    ids = _ids(lm, "Hello there")
    forced = eng.generate([Request(ids, GREEDY.replace(logit_bias={9: 100}))])[0]
    assert forced.token_ids == [9] * 12
    # A frequency penalty of 2 makes a greedy reply that repeated itself repeat less.
    plain = eng.generate([Request(ids, GREEDY)])[0].token_ids
    penalised = eng.generate([Request(ids, GREEDY.replace(frequency_penalty=2.0))])[0].token_ids
    assert len(set(penalised)) >= len(set(plain))
    with pytest.raises(ValueError, match="logit_bias names token"):
        eng.add(Request(ids, GREEDY.replace(logit_bias={10**6: 1})))


def test_penalty_and_bias_validation():
    with pytest.raises(ValueError, match="presence_penalty must be in"):
        GenerationConfig(presence_penalty=2.5)
    with pytest.raises(ValueError, match=r"logit_bias\[3\] must be in"):
        GenerationConfig(logit_bias={3: 101})
    with pytest.raises(ValueError, match="logit_bias keys must be token ids"):
        GenerationConfig(logit_bias={"x": 1})
    cfg = GenerationConfig(logit_bias={"7": -100}).set_param("logit_bias", "1:5, 2:-3")
    assert cfg.logit_bias == {1: 5.0, 2: -3.0}
    assert GenerationConfig().set_param("frequency-penalty", "0.5").frequency_penalty == 0.5
