"""Prompt formats on the tiny tokenizer: exact ids, token types, stop ids, training masks."""

from __future__ import annotations

import pytest

from chatforge.conversation import (
    SEP_TOKEN,
    ChatTemplateFormat,
    EosFormat,
    Message,
    SepFormat,
    detect_format,
    ensure_sep_token,
    get_format,
)

CHAT = [
    Message("system", "Be kind"),
    Message("user", "Hello"),
    Message("assistant", "How are you"),
    Message("user", "Fine"),
]


def _enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_ensure_sep_token_adds_once_and_resizes_model(tiny_tokenizer) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    assert SEP_TOKEN not in tiny_tokenizer.get_vocab()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=32, n_embd=8, n_layer=1, n_head=2)
    )
    sep = ensure_sep_token(tiny_tokenizer, model)
    assert sep == 400 and len(tiny_tokenizer) == 401
    assert model.get_input_embeddings().num_embeddings == 401
    assert ensure_sep_token(tiny_tokenizer, model) == 400  # idempotent
    assert len(tiny_tokenizer) == 401
    assert _enc(tiny_tokenizer, "Hi<sep>") == [*_enc(tiny_tokenizer, "Hi"), 400]  # never split
    assert (
        tiny_tokenizer.decode([400, *_enc(tiny_tokenizer, "Hi")], skip_special_tokens=True) == "Hi"
    )


def test_sep_format_exact_ids_and_types(tiny_tokenizer) -> None:
    sep = ensure_sep_token(tiny_tokenizer)
    fmt = SepFormat(tiny_tokenizer)
    hello, how = _enc(tiny_tokenizer, "Hello"), _enc(tiny_tokenizer, "How are you")
    out = fmt.encode(CHAT[:3])  # the system message is ignored
    assert out.input_ids == [sep, *hello, sep, *how, sep]
    assert out.token_type_ids == [0] * (1 + len(hello)) + [1] * (1 + len(how)) + [0]
    assert out.reply_token_type == 0
    # Literal once, so a change in the fixture tokenizer is caught.
    assert out.input_ids == [400, 331, 79, 400, 330, 87, 384, 266, 400]
    assert out.token_type_ids == [0, 0, 0, 1, 1, 1, 1, 1, 0]
    # Odd number of turns: the reply takes type 1; the final <sep> is there without a
    # generation prompt too (it ends the last turn).
    fine = _enc(tiny_tokenizer, "Fine")
    out3 = fmt.encode(CHAT, add_generation_prompt=False)
    assert out3.input_ids == [sep, *hello, sep, *how, sep, *fine, sep]
    assert out3.token_type_ids[-1 - len(fine) - 1 :] == [0] * (1 + len(fine)) + [1]
    assert out3.reply_token_type == 1
    assert fmt.stop_token_ids() == {sep, tiny_tokenizer.eos_token_id}


def test_sep_format_requires_sep_token(tiny_tokenizer) -> None:
    with pytest.raises(ValueError, match="ensure_sep_token"):
        SepFormat(tiny_tokenizer)


def test_eos_format_ids_and_stop(tiny_tokenizer) -> None:
    fmt = EosFormat(tiny_tokenizer)
    hello, how, fine = (_enc(tiny_tokenizer, t) for t in ("Hello", "How are you", "Fine"))
    out = fmt.encode(CHAT)
    assert out.input_ids == [*hello, 0, *how, 0, *fine, 0]
    assert out.token_type_ids is None and out.reply_token_type is None
    assert fmt.encode(CHAT, add_generation_prompt=False).input_ids == out.input_ids
    assert fmt.stop_token_ids() == {0}


def test_chat_template_matches_hf(tiny_chat_tokenizer) -> None:
    tok = tiny_chat_tokenizer
    fmt = ChatTemplateFormat(tok)
    dicts = [m.to_dict() for m in CHAT]
    for gen in (True, False):
        text = tok.apply_chat_template(dicts, tokenize=False, add_generation_prompt=gen)
        want = tok(text, add_special_tokens=False)["input_ids"]
        hf = tok.apply_chat_template(dicts, tokenize=True, add_generation_prompt=gen)["input_ids"]
        assert want == hf
        out = fmt.encode(CHAT, add_generation_prompt=gen)
        assert out.input_ids == want
        assert out.token_type_ids is None and out.reply_token_type is None
    header = _enc(tok, "assistant\n")
    assert fmt.encode(CHAT).input_ids[-len(header) - 1 :] == [400, *header]
    assert fmt.stop_token_ids() == {401}  # eos is <|im_end|>; <|im_start|> is not a stop


def test_chat_template_stop_ids_include_eos_and_end_of_turn(tiny_chat_tokenizer) -> None:
    tok = tiny_chat_tokenizer
    tok.eos_token = "<|endoftext|>"
    assert ChatTemplateFormat(tok).stop_token_ids() == {0, 401}


def test_detect_and_get_format(tiny_tokenizer, tiny_chat_tokenizer) -> None:
    assert detect_format(tiny_chat_tokenizer) == "chat_template"
    assert detect_format(tiny_tokenizer) == "eos"
    assert detect_format(tiny_chat_tokenizer, recorded="sep") == "sep"
    with pytest.raises(ValueError, match="chat_template, sep, eos"):
        detect_format(tiny_tokenizer, recorded="nope")
    ensure_sep_token(tiny_tokenizer)
    assert detect_format(tiny_tokenizer) == "sep"
    assert isinstance(get_format("sep", tiny_tokenizer), SepFormat)
    assert isinstance(get_format("eos", tiny_tokenizer), EosFormat)
    with pytest.raises(ValueError, match="chat_template, sep, eos"):
        get_format("chatml", tiny_tokenizer)
    with pytest.raises(ValueError, match="no chat template"):
        get_format("chat_template", tiny_tokenizer)


TRAIN = [
    Message("system", "Be kind"),
    Message("user", "Hello"),
    Message("assistant", "How are you"),
    Message("user", "Fine"),
    Message("assistant", "Good"),
]


def test_training_mask_sep(tiny_tokenizer) -> None:
    sep = ensure_sep_token(tiny_tokenizer)
    hello, how, fine, good = (
        _enc(tiny_tokenizer, t) for t in ("Hello", "How are you", "Fine", "Good")
    )
    ids, types, mask = SepFormat(tiny_tokenizer).encode_for_training(TRAIN)
    assert ids == [sep, *hello, sep, *how, sep, *fine, sep, *good, sep]
    assert types == (
        [0] * (1 + len(hello))
        + [1] * (1 + len(how))
        + [0] * (1 + len(fine))
        + [1] * (1 + len(good))
        + [0]
    )
    # Reply tokens plus the <sep> that ends each reply; not the <sep> that opens it.
    assert mask == (
        [False] * (1 + len(hello))
        + [False]
        + [True] * len(how)
        + [True]
        + [False] * len(fine)
        + [False]
        + [True] * len(good)
        + [True]
    )


def test_training_mask_eos(tiny_tokenizer) -> None:
    hello, how, fine, good = (
        _enc(tiny_tokenizer, t) for t in ("Hello", "How are you", "Fine", "Good")
    )
    ids, types, mask = EosFormat(tiny_tokenizer).encode_for_training(TRAIN)
    assert ids == [*hello, 0, *how, 0, *fine, 0, *good, 0]
    assert types is None
    assert mask == (
        [False] * (len(hello) + 1)
        + [True] * (len(how) + 1)
        + [False] * (len(fine) + 1)
        + [True] * (len(good) + 1)
    )


def test_training_mask_chat_template(tiny_chat_tokenizer) -> None:
    tok = tiny_chat_tokenizer
    fmt = ChatTemplateFormat(tok)
    ids, types, mask = fmt.encode_for_training(TRAIN)
    assert ids == fmt.encode(TRAIN, add_generation_prompt=False).input_ids
    assert types is None
    marked = [i for i, m in zip(ids, mask, strict=True) if m]
    # Exactly the replies and their <|im_end|>; not the header nor the newline after.
    assert marked == [*_enc(tok, "How are you"), 401, *_enc(tok, "Good"), 401]
    assert mask[-1] is False  # the "\n" after the last <|im_end|>


def test_training_mask_chat_template_refuses_leading_reply(tiny_chat_tokenizer) -> None:
    with pytest.raises(ValueError, match="user"):
        ChatTemplateFormat(tiny_chat_tokenizer).encode_for_training([Message("assistant", "Hi")])
