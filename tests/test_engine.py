"""The engine against transformers' generate, on tiny random GPT-2 and Llama models."""

from __future__ import annotations

import pytest
import torch

from chatforge import Engine, GenerationConfig, Message, Request, load_model
from chatforge.generation.stream import Detokenizer, StopMatcher, TextStream

PROMPTS = ["Hello there", "What is the capital of France? Tell me a story", "Thanks"]


@pytest.fixture(scope="module", params=["gpt2-fast", "gpt2-hf", "llama-fast", "llama-hf"])
def loaded(request, tiny_gpt2_dir, tiny_llama_dir):
    """Each tiny model through our fast decoder and through transformers' modules."""
    arch, runner = request.param.split("-")
    lm = load_model(
        str(tiny_gpt2_dir if arch == "gpt2" else tiny_llama_dir), dtype="fp32", quantize="none"
    )
    assert lm.info.engine == "fast"
    lm.use_fast = runner == "fast"
    return lm


def _ids(lm, text: str) -> list[int]:
    return lm.format.encode([Message("user", text)]).input_ids


def _hf_greedy(lm, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' generate on a left-padded batch, no early stop."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = torch.tensor(p)
        mask[i, t - len(p) :] = 1
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=pad,
    )
    return out[:, t:].tolist()


def _engine_no_stops(lm) -> Engine:
    eng = Engine.from_loaded(lm, fast=lm.use_fast)
    eng.stop_token_ids = set()  # random weights: compare fixed-length outputs
    return eng


def test_greedy_matches_transformers_generate_single(loaded):
    eng = _engine_no_stops(loaded)
    ids = _ids(loaded, PROMPTS[0])
    ours = eng.generate([Request(ids, GenerationConfig(temperature=0, max_new_tokens=24))])[0]
    assert ours.token_ids == _hf_greedy(loaded, [ids], 24)[0]
    assert ours.finish_reason == "length"
    assert ours.completion_tokens == 24
    assert ours.prompt_tokens == len(ids)


def test_greedy_batch_of_different_lengths_matches_transformers(loaded):
    eng = _engine_no_stops(loaded)
    prompts = [_ids(loaded, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    cfg = GenerationConfig(temperature=0, max_new_tokens=16)
    ours = eng.generate([Request(p, cfg) for p in prompts])
    assert [c.token_ids for c in ours] == _hf_greedy(loaded, prompts, 16)


def test_cache_gives_the_same_tokens_as_full_recompute(loaded):
    """Greedy with the KV cache == argmax of a full forward over the whole sequence each step."""
    eng = _engine_no_stops(loaded)
    ids = _ids(loaded, PROMPTS[1])
    ours = eng.generate([Request(ids, GenerationConfig(temperature=0, max_new_tokens=12))])[0]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            logits = loaded.model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(logits.argmax()))
    assert ours.token_ids == seq[len(ids) :]


def test_sampling_is_reproducible_for_a_seed(loaded):
    eng = _engine_no_stops(loaded)
    ids = _ids(loaded, PROMPTS[0])

    def run(seed, batch_with=None):
        cfg = GenerationConfig(temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=20)
        reqs = [Request(ids, cfg)]
        if batch_with is not None:
            reqs.append(
                Request(batch_with, GenerationConfig(temperature=0.8, seed=99, max_new_tokens=5))
            )
        return eng.generate(reqs)[0].token_ids

    a, b, c = run(1), run(1), run(2)
    assert a == b
    assert a != c
    # Another sequence in the batch (which finishes early) does not change this one's draws.
    assert run(1, batch_with=_ids(loaded, PROMPTS[1])) == a


def test_stop_token_ends_the_reply_and_is_not_in_the_text(loaded):
    eng = _engine_no_stops(loaded)
    ids = _ids(loaded, PROMPTS[0])
    cfg = GenerationConfig(temperature=0, max_new_tokens=24)
    free = eng.generate([Request(ids, cfg)])[0]
    eng.stop_token_ids = {free.token_ids[5]}
    first = free.token_ids.index(free.token_ids[5])
    stopped = eng.generate([Request(ids, cfg, logprobs=0)])[0]
    assert stopped.finish_reason == "stop"
    # The stop token is the last generated token (as vLLM counts it: its logprob, usage),
    # but its text is not in the reply.
    assert (
        stopped.token_ids
        == free.token_ids[: first + 1]
        == [t.token_id for t in stopped.logprobs or []]
    )
    assert stopped.completion_tokens == first + 1
    cut = eng.generate([Request(ids, cfg.replace(max_new_tokens=first))])[0] if first else None
    assert stopped.text == (cut.text if cut else "")


def test_stop_string_cuts_the_text_and_streaming_never_shows_it(loaded):
    eng = _engine_no_stops(loaded)
    ids = _ids(loaded, PROMPTS[2])
    cfg = GenerationConfig(temperature=0, max_new_tokens=30)
    free = eng.generate([Request(ids, cfg)])[0]
    text = free.text
    assert len(text) > 8
    stop = text[4:7]
    events = list(eng.stream([Request(ids, cfg.replace(stop=(stop,)))]))
    streamed = "".join(e.text for e in events)
    final = events[-1].completion
    assert final is not None and final.finish_reason == "stop"
    assert final.text == text[: text.index(stop)]
    assert streamed == final.text
    assert stop not in streamed


def test_streamed_pieces_add_up_to_the_text(loaded):
    eng = _engine_no_stops(loaded)
    reqs = [
        Request(_ids(loaded, p), GenerationConfig(temperature=0, max_new_tokens=10 + 3 * i))
        for i, p in enumerate(PROMPTS)
    ]
    pieces: dict[int, str] = {}
    done = {}
    for ev in eng.stream(reqs):
        pieces[ev.index] = pieces.get(ev.index, "") + ev.text
        if ev.completion:
            done[ev.index] = ev.completion
    assert sorted(done) == [0, 1, 2]
    for i, c in done.items():
        assert pieces[i] == c.text
        assert c.completion_tokens == 10 + 3 * i


def test_max_length_budget_and_clear_error(loaded):
    eng = _engine_no_stops(loaded)
    ids = _ids(loaded, PROMPTS[1])
    c = eng.generate([Request(ids, GenerationConfig(temperature=0, max_length=len(ids) + 3))])[0]
    assert c.completion_tokens == 3 and c.finish_reason == "length"
    with pytest.raises(ValueError, match=f"max_length 5 leaves no room.*already {len(ids)}"):
        eng.generate([Request(ids, GenerationConfig(max_length=5))])


def test_reply_never_runs_past_the_context(loaded):
    eng = _engine_no_stops(loaded)
    ids = (_ids(loaded, PROMPTS[1]) * 20)[:120]  # context is 128
    c = eng.generate([Request(ids, GenerationConfig(temperature=0, max_new_tokens=50))])[0]
    assert c.completion_tokens == 8


def test_detokenizer_holds_back_partial_utf8(tiny_tokenizer):
    ids = tiny_tokenizer.encode("é€", add_special_tokens=False)
    assert len(ids) >= 3  # multi-byte characters split over byte tokens
    d = Detokenizer(tiny_tokenizer)
    out = [d.push(i) for i in ids]
    assert "".join(out) + d.flush() == "é€"
    assert all("\ufffd" not in piece for piece in out)


def test_a_reply_cut_mid_character_does_not_end_on_a_broken_one(tiny_tokenizer):
    ids = tiny_tokenizer.encode("é ✓", add_special_tokens=False)
    s = TextStream(tiny_tokenizer)
    cut = ids[:-1]  # the budget ran out inside "✓" (3 bytes, 3 tokens)
    text = "".join(s.push(i) for i in cut) + s.flush()
    assert text == "é " and s.text == "é "


def test_stop_matcher_holds_back_possible_stops():
    m = StopMatcher(["END"])
    assert m.push("abc E") == "abc "
    assert m.push("N") == ""
    assert m.push("x") == "ENx"
    assert m.push("yyEND zzz") == "yy"
    assert m.stopped and m.text == "abc ENxyy"
    m2 = StopMatcher(["##"])
    assert m2.push("a#") == "a"
    assert m2.flush() == "#"


def test_text_stream_with_real_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Hello! How are you? I am fine", add_special_tokens=False)
    s = TextStream(tiny_tokenizer, stop=["you?"])
    out = "".join(s.push(i) for i in ids if not s.stopped)
    out += s.flush()
    assert out == "Hello! How are "
    assert s.stopped
