"""convmodel's interface: ConversationTokenizer's layout, ConversationModel.generate on the
engine with transformers' knobs, and fit through chatforge's trainer (tiny models)."""

from __future__ import annotations

import json
import math

import pytest

from chatforge import (
    ConversationModel,
    ConversationTokenizer,
    Engine,
    GenerationConfig,
    Message,
    load_model,
)
from chatforge.conversation import ChatTemplateFormat, EosFormat, SepFormat, ensure_sep_token
from chatforge.convmodel.fit import train_config
from chatforge.convmodel.knobs import generation_settings
from chatforge.errors import ChatforgeError, InputError, ParamError
from chatforge.generation.plan import plan_request

CONTEXT = ["Hello", "How are you"]


@pytest.fixture(scope="module")
def trained_tok_dir(tmp_path_factory):
    """A GPT-2 style tokenizer trained by `chatforge tokenizer train` (its CLI entry point)."""
    from chatforge.cli.app import main

    root = tmp_path_factory.mktemp("convmodel-tok")
    data = root / "chats.jsonl"
    lines = [["Hello", "How are you"], ["Hello there", "How are you doing"], ["I am fine", "Good"]]
    data.write_text("".join(json.dumps(c) + "\n" for c in lines * 20), encoding="utf-8")
    out = root / "tok"
    argv = ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--output", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def sep_gpt2_dir(tmp_path_factory):
    """The tiny random GPT-2 with <sep> in its vocabulary (so its format is sep)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from conftest import make_tiny_gpt2

    d = make_tiny_gpt2(tmp_path_factory.mktemp("sep-gpt2"))
    tok, model = AutoTokenizer.from_pretrained(d), GPT2LMHeadModel.from_pretrained(d)
    ensure_sep_token(tok, model)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


# -- ConversationTokenizer -------------------------------------------------------------


def test_layout_is_convmodels_table(trained_tok_dir):
    tok = ConversationTokenizer.from_pretrained(trained_tok_dir)
    assert tok.format == "sep" and tok.sep_token == "<sep>"
    enc = tok(CONTEXT)
    sep = tok.hf_tokenizer.get_vocab()["<sep>"]
    assert tok.sep_token_id == sep
    # position:       0        1        2       3      4       5       6
    tokens = ["<sep>", "Hello", "<sep>", "How", "Ġare", "Ġyou", "<sep>"]
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == tokens
    assert enc["input_ids"] == [sep, *tok.encode("Hello"), sep, *tok.encode("How are you"), sep]
    assert enc["token_type_ids"] == [0, 0, 1, 1, 1, 1, 0]
    assert enc["attention_mask"] == [1, 1, 1, 1, 1, 1, 1]
    # It is the prompt the engine is given (the sep format's own encoding).
    fmt = SepFormat(tok.hf_tokenizer)
    prompt = fmt.encode([Message("assistant", "Hello"), Message("user", "How are you")])
    assert (prompt.input_ids, prompt.token_type_ids) == (enc["input_ids"], enc["token_type_ids"])
    assert prompt.reply_token_type == 0  # the reply takes the last <sep>'s type
    pt = tok(CONTEXT, return_tensors="pt")
    assert tuple(pt["input_ids"].shape) == (1, 7)
    assert pt["token_type_ids"][0].tolist() == enc["token_type_ids"]


@pytest.mark.slow
def test_readme_example_on_a_chitchat_tokenizer(tmp_path):
    """The README's table, ids included: `chatforge tokenizer train` on chitchat, 4096."""
    pytest.importorskip("chitchat_dataset")
    from chatforge.cli.app import main

    out = tmp_path / "tok"
    argv = [
        "tokenizer",
        "train",
        "--data",
        "chitchat",
        "--vocab-size",
        "4096",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    tok = ConversationTokenizer.from_pretrained(out)
    enc = tok(CONTEXT)
    assert enc == {
        "input_ids": [1, 1147, 1, 1215, 354, 288, 1],
        "token_type_ids": [0, 0, 1, 1, 1, 1, 0],
        "attention_mask": [1, 1, 1, 1, 1, 1, 1],
    }
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == [
        "<sep>",
        "Hello",
        "<sep>",
        "How",
        "Ġare",
        "Ġyou",
        "<sep>",
    ]


def test_sep_token_is_added_when_the_tokenizer_has_none(tiny_tokenizer):
    before = len(tiny_tokenizer)
    assert "<sep>" not in tiny_tokenizer.get_vocab()
    tok = ConversationTokenizer(tiny_tokenizer)
    assert tok.format == "sep" and len(tok) == before + 1
    enc = tok(["hi", "how are you", "fine"])
    sep = tok.sep_token_id
    n0, n1, n2 = (len(tok.encode(t)) for t in ("hi", "how are you", "fine"))
    assert enc["input_ids"][0] == sep and enc["input_ids"][-1] == sep
    assert enc["input_ids"].count(sep) == 4
    assert enc["token_type_ids"] == [0] * (1 + n0) + [1] * (1 + n1) + [0] * (1 + n2) + [1]
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])


def test_a_batch_is_padded_with_mask_zero(trained_tok_dir):
    tok = ConversationTokenizer.from_pretrained(trained_tok_dir)
    one, two = tok(["Hello"]), tok(CONTEXT)
    pad = tok.pad_token_id
    right = tok([["Hello"], CONTEXT])
    k = len(two["input_ids"]) - len(one["input_ids"])
    assert right["input_ids"] == [one["input_ids"] + [pad] * k, two["input_ids"]]
    assert right["token_type_ids"] == [one["token_type_ids"] + [0] * k, two["token_type_ids"]]
    assert right["attention_mask"] == [[1] * len(one["input_ids"]) + [0] * k, [1] * 7]
    left = tok([["Hello"], CONTEXT], padding_side="left", return_tensors="pt")
    assert left["input_ids"][0].tolist() == [pad] * k + one["input_ids"]
    assert left["attention_mask"][0].tolist() == [0] * k + [1] * len(one["input_ids"])
    with pytest.raises(ParamError, match="padding_side"):
        tok(CONTEXT, padding_side="middle")


def test_messages_are_accepted(trained_tok_dir):
    tok = ConversationTokenizer.from_pretrained(trained_tok_dir)
    msgs = [Message("assistant", "Hello"), Message("user", "How are you")]
    assert tok(msgs) == tok(CONTEXT)
    dicts = [{"role": "system", "content": "be kind"}, *(m.to_dict() for m in msgs)]
    assert tok(dicts) == tok(CONTEXT)  # the sep format has no system role
    with pytest.raises(InputError, match="not both"):
        tok(["Hello", Message("user", "How are you")])
    with pytest.raises(InputError, match="at least one"):
        tok([])


def test_chat_template_types_follow_the_turn_parity(tiny_chat_tokenizer):
    tok = ConversationTokenizer(tiny_chat_tokenizer)
    assert tok.format == "chat_template" and tok.sep_token_id is None
    msgs = [
        Message("system", "be brief"),
        Message("user", "hi"),
        Message("assistant", "hello there"),
        Message("user", "how are you"),
    ]
    enc = tok(msgs)
    ids = enc["input_ids"]
    assert ids == ChatTemplateFormat(tiny_chat_tokenizer).encode(msgs).input_ids
    # Each ChatML message starts at <|im_start|>; the last one opened is the generation prompt.
    start = tiny_chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    cuts = [i for i, t in enumerate(ids) if t == start] + [len(ids)]
    assert len(cuts) == 6  # system, 3 turns, the generation prompt, the end
    span_types = [0, 0, 1, 0, 1]  # system 0; turns 0 1 0; the reply's turn 1
    want = [span_types[s] for s in range(5) for _ in range(cuts[s + 1] - cuts[s])]
    assert enc["token_type_ids"] == want
    assert enc["attention_mask"] == [1] * len(ids)
    # Strings: roles alternate so the last is the user's.
    plain = tok(["hi", "hello there", "how are you"])
    assert plain == tok(msgs[1:])


def test_eos_format_types_follow_the_turn_parity(tiny_tokenizer):
    tok = ConversationTokenizer(tiny_tokenizer, format="eos")
    enc = tok(["hi", "how are you"])
    assert (
        enc["input_ids"]
        == EosFormat(tiny_tokenizer)
        .encode([Message("assistant", "hi"), Message("user", "how are you")])
        .input_ids
    )
    n0, n1 = len(tok.encode("hi")) + 1, len(tok.encode("how are you")) + 1
    assert enc["token_type_ids"] == [0] * n0 + [1] * n1


# -- ConversationModel.generate ----------------------------------------------------------


@pytest.fixture(scope="module", params=["sep-gpt2", "chat-llama"])
def cmodel(request, sep_gpt2_dir, tiny_llama_dir):
    ref = sep_gpt2_dir if request.param == "sep-gpt2" else tiny_llama_dir
    model = ConversationModel.from_pretrained(ref, dtype="fp32", quantize="none")
    assert model.format == ("sep" if request.param == "sep-gpt2" else "chat_template")
    return model


def test_generate_equals_the_engines_greedy_output(cmodel):
    knobs = dict(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=2)
    out = cmodel.generate(CONTEXT, **knobs)
    assert out.context == CONTEXT and len(out.responses) == 1 and not out.dropped
    lm = cmodel.loaded
    msgs = [Message("assistant", "Hello"), Message("user", "How are you")]
    plan = plan_request(
        lm.format, msgs, lm.info.context_length, GenerationConfig(temperature=0, **knobs)
    )
    (want,) = Engine.from_loaded(lm).generate([plan.request])  # a fresh engine, no shared cache
    (got,) = out.completions
    assert got.token_ids == want.token_ids and got.completion_tokens >= 1
    assert out.responses[0] == want.text
    assert got.prompt_tokens == len(cmodel.tokenizer(CONTEXT)["input_ids"])


def test_samples_are_distinct_and_reproducible_with_a_seed(cmodel):
    knobs = dict(do_sample=True, top_p=0.95, num_return_sequences=4, seed=7, max_new_tokens=8)
    first = cmodel.generate(CONTEXT, **knobs).responses
    assert len(first) == 4 and len(set(first)) > 1
    assert cmodel.generate(CONTEXT, **knobs).responses == first


def test_unknown_or_unsupported_knobs_are_errors(cmodel):
    with pytest.raises(ParamError, match="num_beam_groups is not a generation knob") as e:
        cmodel.generate(CONTEXT, num_beam_groups=2)
    assert e.value.param == "num_beam_groups"
    with pytest.raises(ParamError, match="num_beams must be 1"):
        cmodel.generate(CONTEXT, num_beams=4)
    with pytest.raises(ParamError, match="num_return_sequences must be 1 with greedy decoding"):
        cmodel.generate(CONTEXT, num_return_sequences=2)
    with pytest.raises(ParamError, match="top_p must be in"):
        cmodel.generate(CONTEXT, do_sample=True, top_p=2.0)


def test_knobs_mean_what_they_mean_to_transformers():
    greedy, n = generation_settings({})
    assert greedy.greedy and n == 1
    sampled, _ = generation_settings({"do_sample": True, "top_p": 0.9, "temperature": 0.7})
    assert not sampled.greedy and sampled.top_k == 50 and sampled.top_p == 0.9
    assert generation_settings({"do_sample": True, "top_k": 0})[0].top_k == 0
    assert generation_settings({"stop_strings": ["\n"]})[0].stop == ("\n",)
    with pytest.warns(UserWarning, match="temperature, top_p has no effect"):
        cfg, _ = generation_settings({"temperature": 0.7, "top_p": 0.5})
    assert cfg.greedy
    with pytest.raises(ParamError, match="do_sample must be True or False"):
        generation_settings({"do_sample": "yes"})


# -- ConversationModel.fit ---------------------------------------------------------------

CONVS = [
    ["hello there", "hi! how are you?", "fine, thanks", "good to hear"],
    ["what is your name", "i am a small bot"],
    ["do you like tea", "yes, green tea"],
    ["good night", "sleep well"],
]
FAST = dict(
    max_steps=10,
    batch_size=2,
    context=64,
    lr=3e-3,
    log_every=1,
    eval_every=5,
    save_every=0,
    precision="fp32",
    progress=False,
)


def test_fit_writes_a_sep_model_that_loads_and_generates(tmp_path, tiny_gpt2_dir):
    model = ConversationModel.from_pretrained(tiny_gpt2_dir, dtype="fp32", quantize="none")
    assert model.format == "eos" and model.fit_format() == "sep"  # a plain GPT-2
    out = tmp_path / "fitted"
    result = model.fit(CONVS * 4, CONVS[:2], output_path=out, **FAST)
    assert result.steps == 10 and result.val_losses
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert json.loads((out / "chatforge.json").read_text())["prompt_format"] == "sep"
    assert (out / "checkpoints").is_dir()
    assert load_model(str(out)).info.prompt_format == "sep"
    again = ConversationModel.from_pretrained(out)
    assert again.format == "sep"
    assert isinstance(again.generate(["hello there"], max_new_tokens=5).responses[0], str)
    # The model fit was called on now generates with the trained weights, in sep.
    assert (
        model.format == "sep"
        and len(model.generate(["good night"], max_new_tokens=3).responses) == 1
    )
    tok = ConversationTokenizer.from_pretrained(out)
    assert tok.format == "sep" and tok.sep_token_id == again.tokenizer.sep_token_id


def test_fit_arguments_are_checked_before_anything_is_written(tmp_path, tiny_gpt2_dir):
    model = ConversationModel.from_pretrained(tiny_gpt2_dir, dtype="fp32", quantize="none")
    out = tmp_path / "never"
    with pytest.raises(ParamError, match="learning_rate is not a training argument") as e:
        model.fit(CONVS, output_path=out, learning_rate=1e-3)
    assert e.value.param == "learning_rate"
    with pytest.raises(
        ParamError, match="data is not a fit argument: it is given by train_iterator"
    ):
        model.fit(CONVS, output_path=out, data=["x.jsonl"])
    with pytest.raises(ParamError, match="output_path"):
        model.fit(CONVS)
    with pytest.raises(
        ChatforgeError, match="train_iterator item 1: a conversation needs at least 2"
    ):
        model.fit([CONVS[0], ["alone"]], output_path=out, on_error="fail", **FAST)
    assert not out.exists()


def test_fit_items_take_every_conversation_shape():
    from chatforge.convmodel.fit import conversation_of

    class Example:  # convmodel's ConversationExample
        conversation = ["hi", "hello"]

    want = [Message("user", "hi"), Message("assistant", "hello")]
    assert conversation_of(["hi", "hello"]) == want
    assert conversation_of(("hi", "hello")) == want
    assert conversation_of(Example()) == want
    assert conversation_of([m.to_dict() for m in want]) == want
    assert conversation_of({"messages": [m.to_dict() for m in want]}) == want
    with pytest.raises(ValueError, match="no assistant turn"):
        conversation_of([Message("user", "hi")])
    with pytest.raises(ValueError, match="turn 1 is int"):
        conversation_of(["hi", 3])


def test_convmodel_argument_names_map_to_train_config():
    cfg = train_config(
        "m",
        "out",
        "sep",
        False,
        {"accumulation_steps": 4, "warmup_steps": 10, "max_len": 128, "save_best_model": False},
    )
    assert (cfg.grad_accum, cfg.warmup, cfg.context, cfg.final) == (4, 10, 128, "last")
    assert cfg.format == "sep" and cfg.model == "m"
    assert train_config("m", "out", "sep", False, {"format": "eos"}).format == "eos"
