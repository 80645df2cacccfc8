"""/metrics: Prometheus text format, per-app registry, counters fed by the engine service."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatforge import load_model
from chatforge.server import create_app
from serverkit import ServerThread, wait_until


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")


@pytest.fixture()
def server(model):
    with ServerThread(create_app(model, model_id="tiny")) as srv:
        yield srv


def _scrape(url: str, **kw) -> dict[str, float]:
    """Every sample of /metrics as ``name{label=value,...}`` -> value."""
    r = httpx.get(url + "/metrics", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_counters_and_histograms_follow_the_requests(server):
    before = _scrape(server.url)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    msgs = [{"role": "user", "content": "Hello there"}]
    r1 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None][0]
    prompt = r1.usage.prompt_tokens + usage.prompt_tokens
    generated = r1.usage.completion_tokens + usage.completion_tokens
    # The service thread observes a completion just after handing it over: wait for it.
    assert wait_until(
        lambda: _scrape(server.url)["chatforge_request_duration_seconds_count"] == 2, timeout=5
    )
    m = _scrape(server.url)
    assert m["chatforge_prompt_tokens_total"] - before["chatforge_prompt_tokens_total"] == prompt
    gen = m["chatforge_generation_tokens_total"] - before["chatforge_generation_tokens_total"]
    assert gen == generated
    assert m["chatforge_time_to_first_token_seconds_count"] == 2
    # One gap per token after each request's first.
    assert m["chatforge_inter_token_latency_seconds_count"] == generated - 2
    assert m["chatforge_request_duration_seconds_sum"] > 0
    assert m["chatforge_requests_total{route=/v1/chat/completions,status=200}"] == 2
    cached = m["chatforge_prompt_cached_tokens_total"]
    assert 0 < cached < prompt  # the second request took the first one's prompt blocks
    assert m["chatforge_prefix_cache_hit_ratio"] == pytest.approx(cached / prompt)
    assert m["chatforge_queue_length"] == 0 and m["chatforge_running_sequences"] == 0


def test_errors_are_counted_with_their_status_and_unknown_paths_as_other(server):
    httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny"})  # no messages
    httpx.get(server.url + "/no/such/path")
    httpx.get(server.url + "/v1/models/nope")
    m = _scrape(server.url)
    assert m["chatforge_requests_total{route=/v1/chat/completions,status=400}"] == 1
    assert m["chatforge_requests_total{route=other,status=404}"] == 1
    assert m["chatforge_requests_total{route=/v1/models/{name:path},status=404}"] == 1


def test_each_app_has_its_own_registry(model):
    with ServerThread(create_app(model, model_id="a")) as a:
        httpx.get(a.url + "/v1/models")
        with ServerThread(create_app(model, model_id="b")) as b:
            assert "chatforge_requests_total{route=/v1/models,status=200}" not in _scrape(b.url)
        assert _scrape(a.url)["chatforge_requests_total{route=/v1/models,status=200}"] == 1


def test_metrics_need_the_api_key_when_one_is_set(model):
    with ServerThread(create_app(model, model_id="tiny", api_key="k")) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 401
        m = _scrape(srv.url, headers={"Authorization": "Bearer k"})
        assert m["chatforge_requests_total{route=other,status=401}"] == 1
