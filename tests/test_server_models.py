"""Several models and LoRA adapters behind one server: routing by ``model``, adapters
per request (mixed in one batch, added and removed over HTTP), idle unloading after
``--ttl``, the memory budget, and named models' system prompts and settings."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chatforge import GenerationConfig, Request, load_model
from chatforge.cli.serve import served_models
from chatforge.errors import ParamError
from chatforge.generation.engine import Engine
from chatforge.server import ServedModel, create_app
from lora_helpers import make_adapter
from serverkit import ServerThread, wait_until

GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-adapters")
    return make_adapter(tiny_llama_dir, root / "a", 1), make_adapter(tiny_llama_dir, root / "b", 2)


def _load(path):
    return lambda: load_model(str(path), dtype="fp32", quantize="none")


def _started(srv: ServerThread) -> ServerThread:
    assert wait_until(lambda: srv.state.started, 60)
    return srv


def _complete(url: str, model: str, prompt: str = "Hello there", **extra) -> dict:
    body = {"model": model, "prompt": prompt, **GREEDY, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _local(path, prompt="Hello there", adapter=None) -> str:
    """The same completion from an engine of our own (the reference)."""
    lm = load_model(str(path), dtype="fp32", quantize="none")
    eng = Engine.from_loaded(lm)
    if adapter is not None:
        eng.add_adapter(adapter, "x")
    ids = list(lm.tokenizer.encode(prompt))
    cfg = GenerationConfig(temperature=0, max_new_tokens=8)
    return eng.generate([Request(ids, cfg, adapter=None if adapter is None else "x")])[0].text


def test_two_models_answer_by_name(tiny_llama_dir, tiny_gpt2_dir):
    app = create_app(
        models=[
            ServedModel("llama", _load(tiny_llama_dir)),
            ServedModel("gpt2", _load(tiny_gpt2_dir)),
        ]
    )
    with ServerThread(app) as srv:
        _started(srv)
        cards = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [(c["id"], c["loaded"]) for c in cards] == [("llama", True), ("gpt2", True)]
        assert _complete(srv.url, "llama")["choices"][0]["text"] == _local(tiny_llama_dir)
        gpt2 = _complete(srv.url, "gpt2")
        assert gpt2["model"] == "gpt2"
        assert gpt2["choices"][0]["text"] == _local(tiny_gpt2_dir)
        r = httpx.post(srv.url + "/v1/completions", json={"model": "nope", "prompt": "hi"})
        assert r.status_code == 404 and "'llama', 'gpt2'" in r.json()["error"]["message"]
        health = httpx.get(srv.url + "/health").json()
        assert health["models"] == {"llama": "ready", "gpt2": "ready"}


def test_adapters_are_applied_per_request_on_one_base(tiny_llama_dir, adapters):
    a, b = adapters
    app = create_app(
        models=[
            ServedModel("base", _load(tiny_llama_dir), base="llama"),
            ServedModel("bot-a", _load(tiny_llama_dir), base="llama", adapter_dir=a),
        ]
    )
    with ServerThread(app) as srv:
        _started(srv)
        assert len(srv.state.pool.bases) == 1  # one base in memory for both names
        want = {"base": _local(tiny_llama_dir), "bot-a": _local(tiny_llama_dir, adapter=a)}
        assert want["base"] != want["bot-a"]
        # a mixed crowd: every request gets its own model's answer
        names = ["base", "bot-a"] * 4
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda m: _complete(srv.url, m)["choices"][0]["text"], names))
        assert got == [want[m] for m in names]
        cards = {c["id"]: c for c in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert cards["bot-a"]["parent"] == "base"

        # added over HTTP, listed, used, removed
        r = httpx.post(srv.url + "/v1/adapters", json={"name": "bot-b", "path": str(b)})
        assert r.status_code == 200, r.text
        listed = httpx.get(srv.url + "/v1/adapters").json()["data"]
        assert [x["name"] for x in listed] == ["bot-a", "bot-b"]
        got_b = _complete(srv.url, "bot-b")["choices"][0]["text"]
        assert got_b == _local(tiny_llama_dir, adapter=b)
        assert httpx.delete(srv.url + "/v1/adapters/bot-b").status_code == 200
        r = httpx.post(srv.url + "/v1/completions", json={"model": "bot-b", "prompt": "hi"})
        assert r.status_code == 404
        # bad requests: not an adapter, a name a model has, an unknown field
        r = httpx.post(srv.url + "/v1/adapters", json={"name": "x", "path": str(tiny_llama_dir)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path"
        r = httpx.post(srv.url + "/v1/adapters", json={"name": "base", "path": str(b)})
        assert r.status_code == 409
        r = httpx.post(srv.url + "/v1/adapters", json={"name": "y", "path": str(b), "scale": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "scale"
        assert httpx.delete(srv.url + "/v1/adapters/nope").status_code == 404


def test_idle_models_are_unloaded_after_ttl_and_come_back(tiny_llama_dir, tiny_gpt2_dir):
    app = create_app(
        models=[
            ServedModel("llama", _load(tiny_llama_dir)),
            ServedModel("gpt2", _load(tiny_gpt2_dir)),
        ],
        ttl=0.5,
    )
    with ServerThread(app) as srv:
        _started(srv)
        first = _complete(srv.url, "gpt2")["choices"][0]["text"]

        def loaded() -> dict:
            return {c["id"]: c["loaded"] for c in httpx.get(srv.url + "/v1/models").json()["data"]}

        assert wait_until(lambda: loaded() == {"llama": False, "gpt2": False}, 10)
        assert httpx.get(srv.url + "/health").status_code == 200  # idle is not down
        assert _complete(srv.url, "gpt2")["choices"][0]["text"] == first  # loaded again
        assert loaded()["gpt2"] is True


def test_the_memory_budget_unloads_the_least_recently_used(tiny_llama_dir, tiny_gpt2_dir):
    one = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")
    from chatforge.server.pool import model_bytes

    budget_mb = model_bytes(one) * 1.5 / 2**20  # room for one tiny model, not two
    app = create_app(
        models=[
            ServedModel("llama", _load(tiny_llama_dir)),
            ServedModel("gpt2", _load(tiny_gpt2_dir)),
        ],
        max_memory_mb=budget_mb,
    )
    with ServerThread(app) as srv:
        _started(srv)
        pool = srv.state.pool
        # loading the second at start unloaded the first (idle)
        assert {k: b.ready for k, b in pool.bases.items()} == {"llama": False, "gpt2": True}
        assert pool.used_bytes() <= budget_mb * 2**20
        _complete(srv.url, "gpt2")
        time.sleep(2.1)  # past the grace during which a just-picked model counts as busy
        _complete(srv.url, "llama")
        assert {k: b.ready for k, b in pool.bases.items()} == {"llama": True, "gpt2": False}


def test_named_models_bring_their_system_prompt_and_settings(tiny_llama_dir, adapters):
    from chatforge.models.recipes import create_recipe

    a, _ = adapters
    create_recipe(
        "pirate",
        str(tiny_llama_dir),
        system="You are a pirate.",
        params={"temperature": 0, "max_new_tokens": 5},
        adapter=str(a),
        force=True,
    )
    create_recipe("plain", str(tiny_llama_dir), system="Be brief.", force=True)
    specs = served_models(["pirate", "plain", str(tiny_llama_dir)], [], "fp32", "none")
    assert len({s.base for s in specs}) == 1  # the named models run on the one base
    with ServerThread(create_app(models=specs)) as srv:
        _started(srv)
        cards = {c["id"]: c for c in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert cards["pirate"]["parent"] == str(tiny_llama_dir)  # the plain model, not "plain"
        body = {"model": "pirate", "messages": [{"role": "user", "content": "hi"}]}
        toks = httpx.post(srv.url + "/tokenize", json=body).json()["tokens"]
        lm = srv.state.pool.base_of(srv.state.pool.default).loaded
        assert "You are a pirate." in lm.tokenizer.decode(toks)
        own = {**body, "messages": [{"role": "system", "content": "Arr."}, *body["messages"]]}
        toks = httpx.post(srv.url + "/tokenize", json=own).json()["tokens"]
        assert "pirate" not in lm.tokenizer.decode(toks)  # the request's own system wins
        # the recipe's settings: greedy and 5 tokens unless the request says otherwise
        r1 = httpx.post(srv.url + "/v1/chat/completions", json=body).json()
        r2 = httpx.post(srv.url + "/v1/chat/completions", json=body).json()
        assert r1["usage"]["completion_tokens"] == 5
        assert r1["choices"][0]["message"] == r2["choices"][0]["message"]
        r3 = httpx.post(srv.url + "/v1/chat/completions", json={**body, "max_tokens": 2}).json()
        assert r3["usage"]["completion_tokens"] == 2


def test_serve_options_are_checked_before_loading(tiny_llama_dir, adapters, tmp_path):
    a, _ = adapters
    ref = str(tiny_llama_dir)
    with pytest.raises(ParamError, match="NAME=DIR"):
        served_models([ref], ["just-a-dir"], "fp32", "none")
    with pytest.raises(ParamError, match="not a LoRA adapter"):
        served_models([ref], [f"x={tmp_path}"], "fp32", "none")
    with pytest.raises(ParamError, match="not one of the --model"):
        served_models([ref], [f"x={a}@other"], "fp32", "none")
    with pytest.raises(ParamError, match="served twice"):
        served_models([ref, ref], [], "fp32", "none")
    specs = served_models([ref], [f"bot={a}"], "fp32", "none")
    assert [(s.name, s.adapter_dir) for s in specs] == [(ref, None), ("bot", a.resolve())]


def test_a_named_model_whose_adapter_changes_more_than_linears_is_served_merged(
    tiny_llama_dir, tmp_path
):
    import json

    from chatforge.models.fast.lora import unsupported_settings
    from chatforge.models.recipes import create_recipe

    saved = make_adapter(tiny_llama_dir, tmp_path / "saved", seed=5)
    conf = json.loads((saved / "adapter_config.json").read_text())
    conf["modules_to_save"] = ["lm_head"]
    (saved / "adapter_config.json").write_text(json.dumps(conf))
    assert unsupported_settings(conf) == ["modules_to_save"]
    create_recipe("saved-bot", str(tiny_llama_dir), adapter=str(saved), force=True)
    (spec,) = served_models(["saved-bot"], [], "fp32", "none")
    assert spec.adapter_dir is None and spec.base == "saved-bot (merged)"


def test_serve_cli_rejects_bad_values(capsys):
    from cli_helpers import run

    for args, needle in (
        (["--ttl", "0"], "--ttl must be > 0"),
        (["--max-memory", "-1"], "--max-memory must be > 0"),
        (["-m", "a", "-m", "b", "--served-model-name", "x"], "--served-model-name"),
        (["--adapter", "nonsense"], "--adapter takes NAME=DIR"),
    ):
        code, _, err = run(["serve", *args], capsys)
        assert code == 2 and needle in err, err


def test_one_model_server_still_answers_to_its_names(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")
    app = create_app(lm, model_id="tiny", served_model_names=["bot-a", "bot-b"])
    with ServerThread(app) as srv:
        ids = [c["id"] for c in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert ids == ["bot-a", "bot-b"]
        for name in ("bot-a", "bot-b", "tiny", lm.info.ref):
            assert _complete(srv.url, name)["model"] == "bot-a"


def test_a_request_waits_for_its_model_to_load_again(tiny_llama_dir):
    """After an unload, concurrent requests share one load and all get answers."""
    loads = []

    def counted():
        loads.append(1)
        return load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")

    app = create_app(models=[ServedModel("m", counted)], ttl=0.3)
    with ServerThread(app) as srv:
        _started(srv)
        assert wait_until(lambda: not srv.state.pool.bases["m"].ready, 10)

        async def many():
            async with httpx.AsyncClient(timeout=60) as c:
                body = {"model": "m", "prompt": "hi", **GREEDY}
                return await asyncio.gather(
                    *[c.post(srv.url + "/v1/completions", json=body) for _ in range(4)]
                )

        answers = asyncio.run(many())
        assert all(r.status_code == 200 for r in answers)
        assert len({r.json()["choices"][0]["text"] for r in answers}) == 1
        assert len(loads) == 2  # the start, and one reload for the four requests
