"""Loss masks for each --train-on, long conversations split by turns, packing isolation."""

from __future__ import annotations

import pytest
import torch

from chatforge.conversation import Message, ensure_sep_token, get_format
from chatforge.training.examples import (
    IGNORE,
    Example,
    apply_train_on,
    build_examples,
    collate,
    model_inputs,
    pack,
    packing_isolates,
)

CONV = [
    Message("user", "hi"),
    Message("assistant", "hello"),
    Message("user", "bye"),
    Message("assistant", "see you"),
]


def _learned(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask, strict=True) if m])


def test_masks_for_each_train_on_eos_format(tiny_tokenizer):
    fmt = get_format("eos", tiny_tokenizer)
    ids, _, mask = fmt.encode_for_training(CONV)
    eos = tiny_tokenizer.eos_token
    assert _learned(tiny_tokenizer, ids, apply_train_on(mask, "assistant")) == (
        f"hello{eos}see you{eos}"
    )
    assert apply_train_on(mask, "all") == [True] * len(ids)
    assert _learned(tiny_tokenizer, ids, apply_train_on(mask, "last")) == f"see you{eos}"
    with pytest.raises(ValueError, match="train_on must be one of"):
        apply_train_on(mask, "users")


def test_masks_chat_template_and_sep(tiny_chat_tokenizer, tiny_tokenizer):
    fmt = get_format("chat_template", tiny_chat_tokenizer)
    ids, _, mask = fmt.encode_for_training(CONV)
    assert _learned(tiny_chat_tokenizer, ids, mask) == "hello<|im_end|>see you<|im_end|>"
    last = apply_train_on(mask, "last")
    assert _learned(tiny_chat_tokenizer, ids, last) == "see you<|im_end|>"
    ensure_sep_token(tiny_tokenizer)
    sep = get_format("sep", tiny_tokenizer)
    ids, types, mask = sep.encode_for_training(CONV)
    assert _learned(tiny_tokenizer, ids, mask) == "hello<sep>see you<sep>"
    assert types is not None and len(types) == len(ids)


def test_examples_targets_shift_and_stop_at_example_ends(tiny_tokenizer):
    a = Example([5, 6, 7], None, [False, True, True])
    b = Example([8, 9], None, [True, True])
    (row,) = pack([a, b], context=8)
    assert row.lengths == [3, 2]
    # position t predicts token t+1 of the same example; example ends predict nothing
    assert row.targets == [6, 7, IGNORE, 9, IGNORE]
    batch = collate([row], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    m = batch["attention_mask"][0, 0] == 0  # allowed
    assert m[3].tolist() == [False, False, False, True, False]  # b's first token sees only itself
    assert m[2].tolist() == [True, True, True, False, False]


def test_packing_is_first_fit_and_respects_context():
    exs = [Example([1] * n, None, [True] * n) for n in (6, 5, 3, 2, 2)]
    rows = pack(exs, context=8)
    assert sorted(sum(r.lengths) for r in rows) == [2, 8, 8]  # 6+2, 5+3, 2
    assert all(len(r) <= 8 for r in rows)
    assert len(pack(exs, context=8, enabled=False)) == 5
    with pytest.raises(ValueError, match="longer than the context"):
        pack([Example([1] * 9, None, [True] * 9)], context=8)


def test_long_conversations_split_into_turn_windows(tiny_tokenizer):
    fmt = get_format("eos", tiny_tokenizer)
    conv = []
    for i in range(12):
        conv += [Message("user", f"question number {i}"), Message("assistant", f"answer {i}")]
    from chatforge.training.data import Dataset

    exs, st = build_examples(fmt, Dataset("convmodel", [conv]), context=40, train_on="assistant")
    assert st.split == 1 and len(exs) > 1 and st.truncated == 0
    assert all(len(e) <= 40 for e in exs)
    learned = "".join(_learned(tiny_tokenizer, e.ids, e.mask) for e in exs)
    assert all(f"answer {i}" in learned for i in range(12))  # no reply lost
    last, _ = build_examples(fmt, Dataset("convmodel", [conv]), context=40, train_on="last")
    assert len(last) == 1 and "answer 11" in _learned(tiny_tokenizer, last[0].ids, last[0].mask)


def _packed_vs_alone(model, types: bool):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(3, 300, (7,), generator=g).tolist()
    b = torch.randint(3, 300, (5,), generator=g).tolist()
    ta, tb = ([0] * 4 + [1] * 3, [1] * 5) if types else (None, None)
    ea, eb = Example(a, ta, [True] * 7), Example(b, tb, [True] * 5)
    with torch.no_grad():
        (row,) = pack([ea, eb], context=16)
        packed = model(**model_inputs(collate([row], 0))).logits[0]
        alone = [model(**model_inputs(collate(pack([e], 16), 0))).logits[0] for e in (ea, eb)]
    return packed, torch.cat(alone), torch.tensor(a + b)[None]


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_packed_row_logits_equal_each_example_alone(which, tiny_gpt2_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_gpt2_dir if which == "gpt2" else tiny_llama_dir
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # sdpa, as the trainer uses
    packed, alone, ids = _packed_vs_alone(model, types=which == "gpt2")
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    assert packing_isolates(model, 300, uses_types=which == "gpt2")
    # Why the 4D mask: restarting position_ids alone do not isolate examples on CPU sdpa.
    pos = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        leaky = model(input_ids=ids, position_ids=pos).logits[0]
        # and the mask keeps ordinary causal attention: one example = a plain forward
        types = {"token_type_ids": torch.tensor([[0] * 4 + [1] * 3])} if which == "gpt2" else {}
        plain = model(input_ids=ids[:, :7], **types).logits[0]
    torch.testing.assert_close(alone[:7], plain, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaky[7:], alone[7:], atol=1e-4)
