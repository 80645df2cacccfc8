"""Continuous batching: joins, leaves, limits and cancellation."""

from __future__ import annotations

import pytest

from chatforge import Engine, GenerationConfig, Message, Request, load_model
from chatforge.generation.scheduler import SchedulerConfig

TEXTS = ["Hello there", "What is the capital of France? Tell me a story", "Thanks", "I dreamed"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def engine(request, tiny_gpt2_dir, tiny_llama_dir):
    lm = load_model(str(tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir))
    eng = Engine.from_loaded(lm)
    eng.stop_token_ids = set()  # random weights: fixed-length outputs
    eng._lm = lm
    return eng


def _req(engine, text: str, n: int) -> Request:
    ids = engine._lm.format.encode([Message("user", text)]).input_ids
    return Request(ids, GenerationConfig(temperature=0, max_new_tokens=n))


def test_joining_and_leaving_does_not_change_greedy_output(engine):
    reqs = [_req(engine, t, n) for t, n in zip(TEXTS, [5, 17, 9, 12], strict=True)]
    alone = [engine.generate([r])[0].token_ids for r in reqs]
    # Two places for four requests: the 3rd and 4th join while others are running.
    batched = engine.generate(reqs, max_batch=2)
    assert [c.token_ids for c in batched] == alone
    assert [c.completion_tokens for c in batched] == [5, 17, 9, 12]


def test_a_new_request_joins_at_the_next_step(engine):
    sched = engine.new_scheduler(max_batch=8)
    sched.add(_req(engine, TEXTS[1], 20), key="long")
    for _ in range(3):
        sched.step()
    assert [s.key for s in sched.running] == ["long"]
    sched.add(_req(engine, TEXTS[0], 4), key="short")
    events = sched.step()
    assert {e.index for e in events if e.text or e.completion} <= {"long", "short"}
    assert [s.key for s in sched.running] == ["long", "short"]
    assert len(sched.running[1].generated) == 1  # its first token came with this step
    done = {}
    while sched.has_work:
        for e in sched.step():
            if e.completion:
                done[e.index] = e.completion
                if e.index == "short":
                    # it left while "long" keeps going
                    assert [s.key for s in sched.running] == ["long"]
    assert done["short"].completion_tokens == 4
    assert done["long"].completion_tokens == 20


def test_max_batch_is_respected_and_waiting_requests_wait(engine):
    sched = engine.new_scheduler(max_batch=2)
    for i, t in enumerate(TEXTS):
        sched.add(_req(engine, t, 6), key=i)
    sched.step()
    assert len(sched.running) == 2 and len(sched.waiting) == 2
    seen_max = 0
    while sched.has_work:
        sched.step()
        seen_max = max(seen_max, len(sched.running))
    assert seen_max <= 2


def test_prefill_budget_limits_admissions_per_step(engine):
    cfg = SchedulerConfig(max_batch=8, prefill_tokens=1)
    sched = engine.new_scheduler()
    sched.config = cfg
    for i, t in enumerate(TEXTS):
        sched.add(_req(engine, t, 6), key=i)
    sched.step()
    assert len(sched.running) == 1  # one prompt per step when the budget is tiny
    sched.step()
    assert len(sched.running) == 2


def test_cancel_frees_the_place(engine):
    sched = engine.new_scheduler(max_batch=1)
    sched.add(_req(engine, TEXTS[0], 50), key="a")
    sched.add(_req(engine, TEXTS[2], 3), key="b")
    sched.step()
    assert [s.key for s in sched.running] == ["a"]
    assert sched.cancel("a")
    assert sched.running == []
    done = {}
    while sched.has_work:
        for e in sched.step():
            if e.completion:
                done[e.index] = e.completion
    assert list(done) == ["b"]
    assert not sched.cancel("missing")


def test_bad_request_is_rejected_before_anything_runs(engine):
    ok = _req(engine, TEXTS[0], 4)
    too_long = Request(list(range(1, 200)), GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="context is 128 tokens"):
        list(engine.stream([ok, too_long]))


def test_scheduler_config_validation():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        SchedulerConfig(max_batch=0)
