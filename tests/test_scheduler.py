"""The engine's loop: joins, leaves, limits, chunked prefill, aborts, preemption."""

from __future__ import annotations

import pytest

from chatforge import Engine, GenerationConfig, Message, Request, load_model
from chatforge.generation.engine import EngineConfig
from chatforge.generation.scheduler import SchedulerConfig

TEXTS = ["Hello there", "What is the capital of France? Tell me a story", "Thanks", "I dreamed"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tiny_gpt2_dir, tiny_llama_dir):
    return load_model(str(tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir))


def _engine(lm, **config) -> Engine:
    eng = Engine.from_loaded(lm, EngineConfig(**config))
    eng.stop_token_ids = set()  # random weights: fixed-length outputs
    return eng


def _req(lm, text: str, n: int) -> Request:
    ids = lm.format.encode([Message("user", text)]).input_ids
    return Request(ids, GenerationConfig(temperature=0, max_new_tokens=n))


def _drain(eng: Engine) -> dict:
    done = {}
    while eng.has_work:
        for e in eng.step():
            if e.completion:
                done[e.index] = e.completion
    return done


def test_joining_and_leaving_does_not_change_greedy_output(lm):
    reqs = [_req(lm, t, n) for t, n in zip(TEXTS, [5, 17, 9, 12], strict=True)]
    alone = [_engine(lm).generate([r])[0].token_ids for r in reqs]
    # Two places for four requests: the 3rd and 4th join while others are running.
    batched = _engine(lm, max_batch=2).generate(reqs)
    assert [c.token_ids for c in batched] == alone
    assert [c.completion_tokens for c in batched] == [5, 17, 9, 12]


def test_a_new_request_joins_at_the_next_step(lm):
    eng = _engine(lm)
    long = eng.add(_req(lm, TEXTS[1], 20))
    for _ in range(3):
        eng.step()
    assert eng.occupancy == (1, 0)
    short = eng.add(_req(lm, TEXTS[0], 4))
    events = eng.step()
    assert {e.index for e in events} == {long, short}  # its first token came with this step
    assert eng.occupancy == (2, 0)
    done = {}
    while eng.has_work:
        for e in eng.step():
            if e.completion:
                done[e.index] = e.completion
                if e.index == short:
                    assert eng.occupancy == (1, 0)  # it left while the long one keeps going
    assert done[short].completion_tokens == 4
    assert done[long].completion_tokens == 20


def test_max_batch_is_respected_and_waiting_requests_wait(lm):
    eng = _engine(lm, max_batch=2)
    for t in TEXTS:
        eng.add(_req(lm, t, 6))
    eng.step()
    assert eng.occupancy == (2, 2)
    seen_max = 0
    while eng.has_work:
        eng.step()
        seen_max = max(seen_max, eng.occupancy[0])
    assert seen_max <= 2


def test_long_prompts_are_prefilled_in_chunks_beside_running_decodes(lm):
    eng = _engine(lm, prefill_tokens=4)
    running = eng.add(_req(lm, TEXTS[2], 30))
    eng.step()
    eng.step()
    long = _req(lm, TEXTS[1] * 3, 3)
    assert len(long.prompt_ids) > 12
    h = eng.add(long)
    steps_with_decode = 0
    while eng.has_work:
        events = eng.step()
        if any(e.index == running for e in events):
            steps_with_decode += 1
        if any(e.index == h and e.completion for e in events):
            break
    # The long prompt took several steps (4 prompt tokens each); the running request
    # got a token in every one of them.
    assert steps_with_decode >= len(long.prompt_ids) // 4
    alone = _engine(lm).generate([long])[0]
    assert _drain(eng)  # the running one finishes
    chunked = _engine(lm, prefill_tokens=4).generate([long])[0]
    assert chunked.token_ids == alone.token_ids


def test_abort_frees_the_place(lm):
    eng = _engine(lm, max_batch=1)
    a = eng.add(_req(lm, TEXTS[0], 50))
    b = eng.add(_req(lm, TEXTS[2], 3))
    eng.step()
    assert eng.occupancy == (1, 1)
    assert eng.abort(a)
    assert eng.occupancy == (0, 1)
    assert list(_drain(eng)) == [b]
    assert not eng.abort(12345)


def test_preempted_sequences_finish_with_the_same_tokens(lm):
    """A KV budget of a few blocks: sequences are preempted and recomputed, and the
    greedy output is what each gets alone."""
    reqs = [_req(lm, t, 20) for t in TEXTS]
    alone = [_engine(lm).generate([r])[0].token_ids for r in reqs]
    eng = _engine(lm)
    if eng.blocks is None:
        pytest.skip("no paged cache on this runner")
    per_block = eng.runner.bytes_per_block()
    # Room for about two sequences at a time (each needs ~3 blocks of 16 positions).
    eng.blocks.max_blocks = 6
    assert eng.blocks.max_blocks * per_block < 2**20
    out = eng.generate(reqs)
    assert eng.scheduler.preemptions > 0
    assert [c.token_ids for c in out] == alone


def test_bad_request_is_rejected_before_anything_runs(lm):
    eng = _engine(lm)
    ok = _req(lm, TEXTS[0], 4)
    too_long = Request(list(range(1, 200)), GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="context is 128 tokens"):
        list(eng.stream([ok, too_long]))
    assert not eng.has_work
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        eng.add(Request([1, 2, 10**6], GenerationConfig(max_new_tokens=2)))
    with pytest.raises(ValueError, match="logprobs must be an integer in 0..20"):
        eng.add(Request([1, 2], GenerationConfig(max_new_tokens=2), logprobs=21))


def test_scheduler_config_validation():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        SchedulerConfig(max_batch=0)
    with pytest.raises(ValueError, match="kv_cache_mb must be >= 1"):
        EngineConfig(kv_cache_mb=0)


def test_events_of_a_request_without_a_callback_are_kept_for_it(lm):
    eng = _engine(lm)
    h = eng.add(_req(lm, TEXTS[0], 6))
    other = eng.add(_req(lm, TEXTS[2], 3), on_event=lambda ev: None)
    while eng.has_work:
        eng.step()
    events = eng.events(h)
    assert events[-1].completion is not None and events[-1].completion.completion_tokens == 6
    assert "".join(e.text for e in events) == events[-1].completion.text
    assert sum(len(e.tokens) for e in events) == 6
    assert eng.events(h) == [] and eng.events(other) == []
