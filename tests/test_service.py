"""The engine service: concurrent submitters share one continuously batched decode."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chatforge import Engine, GenerationConfig, Message, Request, load_model
from chatforge.errors import ContextOverflowError
from chatforge.generation.service import EngineService, QueueFullError


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir))
    eng = Engine.from_loaded(lm)
    eng.stop_token_ids = set()
    eng._lm = lm
    return eng


def _req(engine, text, n):
    ids = engine._lm.format.encode([Message("user", text)]).input_ids
    return Request(ids, GenerationConfig(temperature=0, max_new_tokens=n))


def test_threads_get_the_same_results_as_alone(engine):
    texts = [f"Hello {i} there" for i in range(6)]
    alone = [engine.generate([_req(engine, t, 8 + i)])[0].token_ids for i, t in enumerate(texts)]
    svc = EngineService(engine, max_batch=4)
    results: dict[int, list[int]] = {}

    def worker(i):
        h = svc.submit(_req(engine, texts[i], 8 + i))
        text = ""
        for ev in h.events():
            text += ev.text
            if ev.completion:
                assert text == ev.completion.text
                results[i] = ev.completion.token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    svc.close(10)
    assert [results[i] for i in range(6)] == alone


def test_async_submit_cancel_and_errors(engine):
    svc = EngineService(engine, max_batch=2, max_queue=1)

    async def main():
        loop = asyncio.get_running_loop()
        h = svc.submit(_req(engine, "Hello", 100), loop=loop)
        n = 0
        async for _ev in h.aevents():
            n += 1
            if n == 3:
                break  # client went away: the request is cancelled
        for _ in range(50):
            await asyncio.sleep(0.02)
            if svc.occupancy == (0, 0):
                break
        assert svc.occupancy == (0, 0)
        h2 = svc.submit(_req(engine, "Thanks", 5), loop=loop)
        out = [ev async for ev in h2.aevents()]
        assert out[-1].completion.completion_tokens == 5

    asyncio.run(main())
    with pytest.raises(ContextOverflowError):
        svc.submit(Request(list(range(1, 300)), GenerationConfig()))
    svc.close(10)


def test_queue_limit(engine):
    import time

    svc = EngineService(engine, max_batch=1, max_queue=1)
    a = svc.submit(_req(engine, "Hello", 100))
    for _ in range(100):
        if svc.occupancy == (1, 0):
            break
        time.sleep(0.01)
    b = svc.submit(_req(engine, "Thanks", 2))  # waits for the one place
    for _ in range(100):  # the service's max_batch holds even where the engine's is larger
        if svc.engine.occupancy == (1, 1):
            break
        time.sleep(0.01)
    assert svc.engine.occupancy == (1, 1)
    with pytest.raises(QueueFullError, match="retry later"):
        svc.submit(_req(engine, "Hello", 3))
    assert [e for e in b.events()][-1].completion.completion_tokens == 2
    assert [e for e in a.events()][-1].completion.completion_tokens == 100
    svc.close(10)


def test_a_submitted_request_binds_its_processors_once(engine):
    """submit validates in the caller's thread; the engine then reuses that work (a
    grammar's parser was built twice per request before)."""
    from chatforge.generation.processors import LogitsProcessor

    class Counted(LogitsProcessor):
        binds = 0

        def bind(self, engine):
            Counted.binds += 1
            return self

        def process_row(self, view, logits):
            return logits

    svc = EngineService(engine, max_batch=2)
    try:
        req = _req(engine, "Hello there", 3)
        req.processors = [Counted()]
        done = [ev.completion for ev in svc.submit(req).events() if ev.completion]
        assert done[0].completion_tokens == 3
        assert Counted.binds == 1
    finally:
        svc.close()
