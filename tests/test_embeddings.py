"""/v1/embeddings and Engine.embed: mean final hidden state, L2-normalised, via the engine."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest
import torch

from chatforge import load_model
from chatforge.generation.engine import Engine, EngineConfig
from chatforge.generation.types import Request
from chatforge.server import create_app
from serverkit import ServerThread

TEXTS = ["Hello there", "The capital of France is Paris, a big city.", "a"]


def _reference(lm, ids: list[int]) -> torch.Tensor:
    """transformers' last hidden state (after the final norm), mean over tokens, unit norm."""
    with torch.no_grad():
        out = lm.model(torch.tensor([ids]), output_hidden_states=True)
    mean = out.hidden_states[-1][0].float().mean(0)  # (H,)
    return mean / mean.norm()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tiny_gpt2_dir, tiny_llama_dir):
    path = tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir
    return load_model(str(path), dtype="fp32", quantize="none")


@pytest.fixture(scope="module")
def server(model):
    # A small queue and batch: a request with many inputs must still go through.
    app = create_app(model, model_id="tiny", max_queue=4, max_batch=2)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x")


def _post(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", **body}, timeout=60)


def test_matches_transformers(client, model):
    r = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2]
    for text, d in zip(TEXTS, r.data, strict=True):
        ref = _reference(model, model.tokenizer.encode(text))
        got = torch.tensor(d.embedding)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) < 1e-4
        assert abs(float(got.norm()) - 1) < 1e-5


def test_base64_decodes_to_the_same_floats(server, client):
    floats = _post(server, input=TEXTS[1]).json()["data"][0]["embedding"]
    raw = _post(server, input=TEXTS[1], encoding_format="base64").json()["data"][0]["embedding"]
    data = base64.b64decode(raw)
    assert struct.unpack(f"<{len(data) // 4}f", data) == pytest.approx(floats, abs=1e-7)
    # The SDK asks for base64 when no format is given and decodes it itself.
    sdk = client.embeddings.create(model="tiny", input=TEXTS[1]).data[0].embedding
    assert sdk == pytest.approx(floats, abs=1e-7)


def test_a_batch_equals_each_input_alone(client):
    batch = client.embeddings.create(model="tiny", input=TEXTS * 3, encoding_format="float")
    assert len(batch.data) == 9  # more inputs than the queue holds (max_queue=4)
    for i, text in enumerate(TEXTS * 3):
        alone = client.embeddings.create(model="tiny", input=text, encoding_format="float")
        assert batch.data[i].embedding == pytest.approx(alone.data[0].embedding, abs=1e-6)


def test_token_id_inputs(server, model):
    ids = [model.tokenizer.encode(t) for t in TEXTS]
    by_text = _post(server, input=TEXTS).json()["data"]
    one = _post(server, input=ids[1]).json()["data"]
    many = _post(server, input=ids).json()["data"]
    assert len(one) == 1 and one[0]["embedding"] == pytest.approx(by_text[1]["embedding"])
    for a, b in zip(many, by_text, strict=True):
        assert a["embedding"] == pytest.approx(b["embedding"])


def test_usage_counts_every_input_token(server, model):
    body = _post(server, input=TEXTS).json()
    n = sum(len(model.tokenizer.encode(t)) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert body["object"] == "list" and body["model"] == "tiny"
    assert all(d["object"] == "embedding" for d in body["data"])


def test_dimensions_is_refused(server, client):
    r = _post(server, input="hi", dimensions=8)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input="hi", dimensions=8)


@pytest.mark.parametrize("bad", ["", [], [""], [[]], ["a", ""], ["a", 1], [True]])
def test_empty_or_malformed_input_is_a_400_naming_input(server, bad):
    r = _post(server, input=bad)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "input"


def test_too_long_input_is_a_context_error(server, model):
    r = _post(server, input=[[5] * (model.info.context_length + 1)])
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "input" and err["code"] == "context_length_exceeded"
    assert "maximum context length" in err["message"]


def test_unknown_model_is_a_404(server):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "nope", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# -------------------------------------------------------------------- the engine


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "transformers"])
def test_engine_embed_chunked_and_beside_generation(model, fast):
    """Both runners; a prompt prefilled in chunks; beside a request that generates."""
    engine = Engine.from_loaded(model, EngineConfig(prefill_tokens=4), fast=fast)
    ids = [model.tokenizer.encode(t) for t in TEXTS]
    alone = engine.embed(ids)
    for got, x in zip(alone, ids, strict=True):
        assert float((torch.tensor(got) - _reference(model, x)).abs().max()) < 1e-4
    gen = Request(ids[1], max_new_tokens=5)
    mixed = engine.generate([gen, Request(ids[1], max_new_tokens=0, embed=True)])
    assert mixed[0].completion_tokens == 5 and mixed[0].embedding is None
    assert mixed[1].embedding == pytest.approx(alone[1], abs=1e-6)


def test_an_embedding_request_generates_nothing(model):
    engine = Engine.from_loaded(model)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        engine.add(Request([1, 2, 3], embed=True))
