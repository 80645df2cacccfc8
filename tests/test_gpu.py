"""On a CUDA GPU (skipped without one): the engine and training where they run there.

``pytest -m gpu`` on a GPU machine. The engine's GPU path is the fast decoder's torch
forward with dense weights, KV pool, index tensors and sampling on the device; these
tests compare it with transformers on the same GPU. Exact greedy equality is asked in
fp32 (torch leaves TF32 off for matmuls by default); in bf16, where two correct
implementations round differently, the logits are compared within a tolerance.
The CPU-side plumbing of the same code is tested in ``test_device.py``.

``CHATFORGE_GPU_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py`` dry-runs these tests on
the CPU (the torch path, fp32) to check the tests themselves; the GPU-only ones skip.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from chatforge import Engine, GenerationConfig, Message, Request, load_model
from chatforge.generation.engine import EngineConfig

DEVICE = os.environ.get("CHATFORGE_GPU_TEST_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
KIND = torch.device(DEVICE).type

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
gpu_only = pytest.mark.skipif(not ON_GPU, reason="a dry run on the CPU")


def _load(ref, **kw):
    """A model on the test's device (a dry run: the CPU, dense, the GPU's torch path)."""
    if not ON_GPU:
        kw.setdefault("quantize", "none")
    lm = load_model(str(ref), device=DEVICE, **kw)
    if not ON_GPU and lm.fast is not None:
        lm.fast.native = None
    return lm


PROMPTS = ["Hello there", "What is the capital of France? Tell me a story", "Thanks"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tiny_llama_dir, tiny_gpt2_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir


def _ids(lm, text: str) -> list[int]:
    return lm.format.encode([Message("user", text)]).input_ids


def _engine(lm) -> Engine:
    eng = Engine.from_loaded(lm, EngineConfig(device=DEVICE))
    eng.stop_token_ids = set()  # random weights: fixed-length replies
    return eng


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    dev = next(hf.parameters()).device
    out = hf.generate(
        input_ids=torch.tensor([ids], device=dev),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


@gpu_only
def test_auto_picks_the_gpu_dense_bf16_or_fp16(model_dir):
    lm = load_model(str(model_dir))  # every default: --device auto
    assert lm.info.device.startswith("cuda")
    assert lm.info.dtype == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert lm.info.quantize == "none" and lm.info.engine == "fast"
    assert lm.fast.kernel_path == "torch" and lm.fast.device.type == "cuda"
    eng = Engine.from_loaded(lm)
    assert eng.device.type == "cuda" and eng.runner.kv.k[0].device.type == "cuda"


def test_fp32_greedy_equals_transformers_generate_on_the_same_gpu(model_dir):
    lm = _load(model_dir, dtype="fp32")
    hf = lm.model  # transformers' copy, loaded again onto the same device
    assert next(hf.parameters()).device.type == KIND
    eng = _engine(lm)
    prompts = [_ids(lm, p) for p in PROMPTS]
    cfg = GenerationConfig(temperature=0, max_new_tokens=24)
    batch = [c.token_ids for c in eng.generate([Request(p, cfg) for p in prompts])]
    assert batch == [_hf_greedy(hf, p, 24) for p in prompts]
    # a batch of different lengths: each row as when it runs alone
    assert batch == [eng.generate([Request(p, cfg)])[0].token_ids for p in prompts]


@gpu_only
def test_bf16_logits_stay_close_to_transformers_in_bf16(model_dir):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    lm = _load(model_dir, dtype="bf16")
    hf = lm.model
    eng = _engine(lm)
    ids = _ids(lm, PROMPTS[1])
    ours = eng.score(ids + [5], top=0)  # logprob of each next prompt token
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids + [5]], device="cuda")).logits.float(), -1)
    expect = [float(ref[0, i, t]) for i, t in enumerate((ids + [5])[1:])]
    got = [t.logprob for t in ours[1:]]
    assert max(abs(a - b) for a, b in zip(got, expect, strict=True)) < 0.1


def test_streaming_logprobs_and_a_grammar_on_the_gpu(model_dir):
    lm = _load(model_dir, dtype="fp32")
    hf = lm.model
    eng = _engine(lm)
    ids = _ids(lm, PROMPTS[0])
    greedy = GenerationConfig(temperature=0, max_new_tokens=8)
    c = eng.generate([Request(ids, greedy, logprobs=2)])[0]
    assert "".join(e.text for e in eng.stream([Request(ids, greedy)])) == c.text
    with torch.no_grad():
        full = torch.tensor([ids + c.token_ids], device=DEVICE)
        ref = torch.log_softmax(hf(full).logits.float(), -1)[0, len(ids) - 1 : -1]
    for row, t in enumerate(c.logprobs):
        assert t.logprob == pytest.approx(float(ref[row, t.token_id]), abs=1e-3)
    eng.stop_token_ids = set(Engine.from_loaded(lm).stop_token_ids)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    reqs = [
        Request(
            ids, GenerationConfig(temperature=1.0, seed=s, max_new_tokens=40, json_schema=schema)
        )
        for s in range(4)
    ]
    for out in eng.generate(reqs):  # sampled on the device, masked by the grammar
        assert isinstance(json.loads(out.text)["n"], int), out


def test_a_lora_adapter_per_request_equals_the_merged_model(tiny_llama_dir, tmp_path):
    from lora_helpers import make_adapter

    adapter = make_adapter(tiny_llama_dir, tmp_path / "lora", seed=1)
    merged = _load(adapter, dtype="fp32", fast=False)  # peft-merged
    base = _load(tiny_llama_dir, dtype="fp32")
    eng = _engine(base)
    eng.add_adapter(str(adapter), name="a")
    ids = _ids(base, PROMPTS[1])
    cfg = GenerationConfig(temperature=0, max_new_tokens=16)
    ours = eng.generate([Request(ids, cfg, adapter="a"), Request(ids, cfg)])
    assert ours[0].token_ids == _hf_greedy(merged.model, ids, 16)
    assert ours[1].token_ids == _hf_greedy(base.model, ids, 16)


@pytest.mark.parametrize("lora", [True, False])
def test_training_runs_on_the_gpu(lora, tmp_path, tiny_llama_dir):
    from chatforge.training.config import TrainConfig
    from chatforge.training.trainer import train
    from training_helpers import write_convmodel

    data = write_convmodel(tmp_path / "d.jsonl", n=24)
    cfg = TrainConfig(
        data=[str(data)],
        output=str(tmp_path / "out"),
        model=str(tiny_llama_dir),
        lora=lora,
        max_steps=3,
        batch_size=2,
        context=64,
        progress=False,
    )
    res = train(cfg)
    assert res.steps == 3
    if ON_GPU:
        assert res.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert next(res.model.parameters()).device.type == KIND
    assert all(loss == loss for _, loss in res.val_losses)  # finite (not NaN)
    # the result loads and runs on the GPU
    lm = _load(tmp_path / "out")
    ids = _ids(lm, PROMPTS[0])
    assert lm.fast is None or lm.fast.device.type == KIND
    out = Engine.from_loaded(lm).generate([Request(ids, GenerationConfig(max_new_tokens=4))])[0]
    assert out.finish_reason in ("stop", "length")
