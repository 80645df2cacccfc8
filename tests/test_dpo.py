"""DPO: preference files in every shape people have, the pair encoding, and the loss
against TRL's DPOTrainer on the same batch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatforge.conversation.messages import Message
from chatforge.training.data import DataError
from chatforge.training.dpo import batch_loss, collate_pairs, completion_logps, dpo_loss
from chatforge.training.preference import (
    Pair,
    PairExample,
    encode_pairs,
    load_preferences,
    parse_pair,
)

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


@pytest.mark.parametrize(
    "obj, shape, prompt",
    [
        (
            {
                "prompt": PROMPT,
                "chosen": [{"role": "assistant", "content": "Hello. How are you?"}],
                "rejected": [{"role": "assistant", "content": "Well, hello there friend."}],
            },
            "conversational",
            [Message("system", "Be brief."), Message("user", "Hi?")],
        ),
        (
            {
                "chosen": [*PROMPT, {"role": "assistant", "content": "Hello. How are you?"}],
                "rejected": [
                    *PROMPT,
                    {"role": "assistant", "content": "Well, hello there friend."},
                ],
            },
            "implicit",
            [Message("system", "Be brief."), Message("user", "Hi?")],
        ),
        (
            {
                "prompt": "Hi?",
                "chosen": "Hello. How are you?",
                "rejected": "Well, hello there friend.",
            },
            "standard",
            [Message("user", "Hi?")],
        ),
        (
            {
                "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello. How are you?",
                "rejected": "\n\nHuman: Hi?\n\nAssistant: Well, hello there friend.",
            },
            "hh",
            [Message("user", "Hi?")],
        ),
    ],
)
def test_every_preference_shape_reads_as_the_same_pair(obj, shape, prompt):
    pair, got = parse_pair(obj)
    assert got == shape
    assert pair == Pair(prompt, "Hello. How are you?", "Well, hello there friend.")


def test_anthropic_hh_keeps_earlier_turns_as_the_prompt():
    pair, _ = parse_pair(
        {
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad",
        }
    )
    assert [m.role for m in pair.prompt] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("good", "bad")


@pytest.mark.parametrize(
    "obj, says",
    [
        ({"prompt": "x", "chosen": "a"}, "expected"),
        ({"prompt": "x", "chosen": "a", "rejected": "a"}, "same text"),
        ({"prompt": "x", "chosen": "a", "rejected": ""}, "must not be empty"),
        ({"prompt": "x", "chosen": "a", "rejected": [{"role": "assistant"}]}, "both be"),
        (
            {
                "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
                "rejected": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "b"},
                ],
            },
            "differ before",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "p"}],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "one assistant message",
        ),
        ({"chosen": "no markers", "rejected": "none here"}, "Human"),
    ],
)
def test_a_malformed_pair_says_what_is_wrong(obj, says):
    with pytest.raises(ValueError, match=says):
        parse_pair(obj)


def test_bad_lines_are_named_and_skipped_or_fatal(tmp_path):
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n\n" + json.dumps({"chosen": "a"}) + "\n")
    seen: list[str] = []
    prefs = load_preferences(path, warn=seen.append)
    assert len(prefs) == 1 and prefs.shapes == {"standard": 1}
    assert seen == [
        f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f'{path}:4: expected {{"prompt", "chosen", "rejected"}} or {{"chosen", "rejected"}}',
    ]
    with pytest.raises(DataError, match=r"prefs.jsonl:2: invalid JSON.*--on-error skip"):
        load_preferences(path, on_error="fail")
    with pytest.raises(DataError, match="does not exist"):
        load_preferences(tmp_path / "missing.jsonl")


def test_pairs_encode_with_the_models_format(tiny_llama_dir):
    from transformers import AutoTokenizer

    from chatforge.conversation.formats import get_format

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fmt = get_format("chat_template", tok)
    pair = Pair([Message("user", "Hi?")], "Hello.", "Well, hello there.")
    [ex], stats = encode_pairs(fmt, [pair], context=64)
    assert stats.kept == 1 and stats.dropped == 0
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # The prompt is what generation would feed; each completion is the reply + <|im_end|>.
    want_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi?"}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(want_prompt, list):  # transformers 5 returns a BatchEncoding
        want_prompt = want_prompt["input_ids"]
    assert ex.prompt == list(want_prompt)
    assert ex.chosen == tok.encode("Hello.", add_special_tokens=False) + [end]
    assert ex.rejected == tok.encode("Well, hello there.", add_special_tokens=False) + [end]
    # Too long: the completion is cut to the context; a prompt that fills it is dropped.
    [cut], stats = encode_pairs(fmt, [pair], context=len(ex.prompt) + 2)
    assert stats.truncated == 1 and len(cut.chosen) == len(cut.rejected) == 2
    none, stats = encode_pairs(fmt, [pair], context=len(ex.prompt))
    assert none == [] and stats.dropped == 1 and "prompt alone" in stats.drop_reasons[0]


def _lora_model(path, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    # init_lora_weights=False: B is random too, so the trained model differs from the reference.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, cfg)


def _examples() -> list[PairExample]:
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(5, 300, (n,), generator=g).tolist()

    return [PairExample(ids(7), ids(5), ids(9)), PairExample(ids(4), ids(11), ids(3))]


def test_a_fresh_adapter_is_its_own_reference():
    """With LoRA's B at zero the model is the reference: loss log 2, rewards 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    out = batch_loss(model, collate_pairs(_examples(), pad_id=0))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.chosen_rewards.abs().max().item() < 1e-6
    out.loss.backward()
    # Only the adapter learns; its B matrices get a gradient (A's is 0 while B is 0).
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_completion_logps_count_only_completion_tokens(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    examples = _examples()
    batch = collate_pairs(examples, pad_id=0)
    got = completion_logps(model, batch)
    with torch.no_grad():
        for r, ex in enumerate(examples):
            row = ex.prompt + ex.chosen
            logits = model(torch.tensor([row])).logits[0].log_softmax(-1)
            want = sum(logits[t - 1, row[t]].item() for t in range(len(ex.prompt), len(row)))
            assert got[r].item() == pytest.approx(want, rel=1e-5)
    full = completion_logps(model, batch, head_ok=False)  # the full-logits path agrees
    assert torch.allclose(got, full, rtol=1e-5)


@pytest.mark.slow
def test_our_dpo_loss_equals_trls_on_the_same_batch(tiny_llama_dir, tmp_path):
    """TRL's DPOTrainer.compute_loss and ours, on one batch, the same LoRA model."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = _lora_model(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    args = DPOConfig(
        output_dir=str(tmp_path), beta=0.1, report_to=[], use_cpu=True, logging_steps=1
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    # TRL keeps a copy of an adapter it is given as the reference ("ref"); without it,
    # its reference is the adapter switched off, as ours for a new adapter.
    trainer.model.delete_adapter("ref")
    batch = collate_pairs(_examples(), pad_id=tok.pad_token_id)
    model.eval()  # no dropout: both see the same function
    theirs = trainer.compute_loss(trainer.model, dict(batch))
    ours = batch_loss(trainer.model, batch, beta=0.1)
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    assert ours.loss.item() != pytest.approx(math.log(2), abs=1e-3)  # not a trivial batch
    metrics = trainer._metrics["eval"]  # the model is in eval mode
    assert sum(metrics["rewards/margins"]) / len(metrics["rewards/margins"]) == pytest.approx(
        ours.margins.mean().item(), rel=1e-4, abs=1e-6
    )


def test_dpo_loss_prefers_the_chosen_reply():
    policy = torch.tensor([-1.0, -2.0, -3.0, -1.0])  # chosen, chosen, rejected, rejected
    ref = torch.tensor([-2.0, -2.0, -2.0, -2.0])
    out = dpo_loss(policy, ref, beta=0.5)
    assert out.chosen_rewards.tolist() == [0.5, 0.0]
    assert out.rejected_rewards.tolist() == [-0.5, 0.5]
    assert out.accuracy == 0.5
    want = -(torch.nn.functional.logsigmoid(torch.tensor([1.0, -0.5])).mean())
    assert out.loss.item() == pytest.approx(want.item())


def test_held_out_pairs_score_alike_on_the_engine_and_transformers(tiny_llama_dir):
    """The engine's scoring (prefix-cached, what eval uses) equals the training forward."""
    from chatforge import load_model
    from chatforge.training.pref_eval import encode_for, pair_logps, summarize

    pairs = [
        Pair([Message("user", f"question {i}?")], f"short {i}?", f"a much longer answer {i}")
        for i in range(5)
    ]
    fast = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")
    slow = load_model(str(tiny_llama_dir), fast=False)
    a = pair_logps(fast, encode_for(fast, pairs))
    b = pair_logps(slow, encode_for(slow, pairs))
    assert a.shape == (5, 2) and torch.allclose(a, b, rtol=1e-4)
    s = summarize("tiny", a, ref=a)
    assert s.pairs == 5 and s.reward_margin == 0.0 and s.reward_accuracy == 0.0
    assert s.accuracy == float(((a[:, 0] - a[:, 1]) > 0).double().mean())


def test_eval_on_a_preference_file_reports_both_models(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from chatforge.cli.app import app

    path = tmp_path / "prefs.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": "ok?"}],
            "rejected": [{"role": "assistant", "content": "no, a long one"}],
        }
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = str(tiny_llama_dir)
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "-m",
            m,
            "--compare",
            m,
            "--data",
            str(path),
            "--replies",
            "2",
            "--max-new-tokens",
            "4",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["pairs"] == 4 and len(out["models"]) == 2 and len(out["samples"]) == 2
    first, second = out["models"]
    assert first["reward_margin"] is None and second["reward_margin"] == pytest.approx(0.0)
    assert first["accuracy"] == second["accuracy"]


def _pref_file(path, n: int = 12):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"tell me about item {i}"}],
            "chosen": [{"role": "assistant", "content": f"item {i} is fine. and you?"}],
            "rejected": [{"role": "assistant", "content": f"item {i} is fine. that is all."}],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_dpo_learns_the_preference_and_writes_an_adapter(tiny_llama_dir, tmp_path):
    """train --dpo on a tiny model: the loss falls, the rewards say the chosen reply wins,
    and the output is a LoRA adapter that eval scores above its base."""
    from typer.testing import CliRunner

    from chatforge.cli.app import app
    from chatforge.training.plot import read_metrics

    prefs = _pref_file(tmp_path / "prefs.jsonl")
    out = tmp_path / "dpo"
    args = [
        "train",
        "--dpo",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(prefs),
        "--max-steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--beta",
        "0.5",
        "--output",
        str(out),
        "--quiet",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "adapter_config.json").is_file()
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 12 and all("reward_margin" in r for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # a fresh adapter: log 2
    assert rows[-1]["loss"] < 0.3 and rows[-1]["reward_accuracy"] == 1.0
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "-m",
            str(tiny_llama_dir),
            "--compare",
            str(out),
            "--data",
            str(prefs),
            "--replies",
            "0",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    base, tuned = json.loads(res.stdout)["models"]
    assert tuned["accuracy"] == 1.0 and tuned["reward_accuracy"] == 1.0
    # eval's rewards use beta 0.1: the chosen reply gained > 2 nats on the rejected one
    assert tuned["reward_margin"] > 0.2 and tuned["margin"] > base["margin"] + 2


def test_train_dpo_checks_its_input_before_loading(tiny_llama_dir, tmp_path, capsys):
    from cli_helpers import run

    prefs = _pref_file(tmp_path / "prefs.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a"}\n')
    base = ["train", "--dpo", "--output", str(tmp_path / "o")]
    cases = [
        (base + ["--init", "gpt2", "--data", str(prefs)], "give --model, not --init"),
        (base + ["--model", str(tiny_llama_dir), "--data", str(bad)], "no usable preference"),
        (
            base + ["--model", str(tiny_llama_dir), "--data", str(prefs), "--beta", "0"],
            "--beta must be > 0",
        ),
    ]
    for argv, says in cases:
        code, out, err = run(argv, capsys)
        assert code == 2 and says in err, (argv, err)
    assert not (tmp_path / "o").exists()
