"""Generating past the context (``GenerationConfig.slide``, ``--slide``): the oldest tokens
after a kept head are dropped and the window is computed again, exactly; without it, a
reply cut by the context says so."""

from __future__ import annotations

import json

import httpx
import pytest

from chatforge import GenerationConfig, Message, Request, load_model
from chatforge.conversation.budget import (
    BudgetConfig,
    context_caps_reply,
    fit_prompt,
    reply_budget,
)
from chatforge.errors import ContextOverflowError, ParamError
from chatforge.generation.engine import Engine, slide_drop
from chatforge.generation.plan import plan_request, system_head
from chatforge.generation.sequence import Sequence
from chatforge.openai_api import request_params
from chatforge.server import Limits, create_app
from cli_helpers import run
from conftest import make_tiny_gpt2
from serverkit import ServerThread

CONTEXT = 64
NO_EOS = {0: -100.0}  # the tiny tokenizer's EOS: random weights would stop anywhere


def greedy(**kw) -> GenerationConfig:
    return GenerationConfig(temperature=0, **kw)


@pytest.fixture(scope="module")
def gpt64_dir(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2-64"), positions=CONTEXT)


@pytest.fixture(scope="module")
def gpt64(gpt64_dir):
    lm = load_model(str(gpt64_dir), dtype="fp32", quantize="none")
    assert lm.info.context_length == CONTEXT
    return lm


def _engine(lm, fast: bool = True) -> Engine:
    eng = Engine.from_loaded(lm, fast=fast)
    eng.stop_token_ids = set()  # random weights: fixed-length outputs
    return eng


def _prompt(lm) -> list[int]:
    return lm.tokenizer.encode("Hello there, how are you today?")


def _exact(lm) -> bool:
    """Whether logits are bit-identical however rows are batched (the C step)."""
    return bool(getattr(lm.fast, "native", False))


# ------------------------------------------------------------------ the reply budget


def test_with_slide_the_context_does_not_cap_the_reply_budget():
    assert reply_budget(10, 64, max_new_tokens=200) == 54
    assert reply_budget(10, 64, max_new_tokens=200, slide=True) == 200
    assert reply_budget(10, 64, slide=True) == 256  # the default length, not the context
    assert reply_budget(10, 64, max_length=100, slide=True) == 90  # max_length still counts
    with pytest.raises(ContextOverflowError):  # the prompt itself must still fit
        reply_budget(64, 64, max_new_tokens=5, slide=True)
    assert GenerationConfig(max_new_tokens=200, slide=True).reply_budget(10, 64) == 200


def test_the_budget_knows_when_the_context_cut_it():
    assert context_caps_reply(10, 64, max_new_tokens=200)
    assert not context_caps_reply(10, 64, max_new_tokens=54)  # asked for exactly that much
    assert not context_caps_reply(10, 64, max_new_tokens=20)
    assert not context_caps_reply(10, 64, max_new_tokens=200, slide=True)
    assert context_caps_reply(10, 64, max_new_tokens=200, cap=54)  # plan_request's cap
    assert not context_caps_reply(10, 64, max_new_tokens=200, cap=30)  # the caller's own
    assert not context_caps_reply(10, 64, max_new_tokens=200, cap=0)  # scoring


def test_fitting_history_with_slide_only_needs_room_for_the_start_of_a_reply(gpt64):
    fmt = gpt64.format
    history = [Message("user", "word " * 4), Message("assistant", "reply " * 4)]
    messages = [*history, Message("user", "and now?")]
    # Without slide, 200 tokens never fit: every droppable turn goes.
    plain = fit_prompt(fmt, messages, CONTEXT, 200, BudgetConfig(min_reply_tokens=8))
    assert plain.dropped == [0, 1]
    slid = fit_prompt(fmt, messages, CONTEXT, 200, BudgetConfig(min_reply_tokens=8), slide=True)
    assert slid.dropped == [] and slid.max_new_tokens == 200


# ------------------------------------------------------------------ the settings


def test_slide_and_keep_are_validated_settings():
    with pytest.raises(ParamError, match="slide must be True or False") as e:
        GenerationConfig(slide="yes")  # type: ignore[arg-type]
    assert e.value.param == "slide"
    with pytest.raises(ParamError, match="keep must be >= 0") as e:
        GenerationConfig(keep=-1)
    assert e.value.param == "keep"
    with pytest.raises(ParamError, match="keep must be an integer"):
        GenerationConfig(keep=2.5)  # type: ignore[arg-type]
    cfg = GenerationConfig()
    assert cfg.set_param("slide", "on").slide is True
    assert cfg.set_param("slide", "off").slide is False
    assert cfg.set_param("keep", "12").keep == 12
    assert cfg.set_param("keep", "none").keep is None
    with pytest.raises(ParamError, match="slide must be on or off"):
        cfg.set_param("slide", "maybe")
    assert cfg.to_dict()["slide"] is False and cfg.to_dict()["keep"] is None
    for preset in ("precise", "balanced", "creative"):  # presets leave it off
        assert GenerationConfig.from_preset(preset).slide is False


def test_the_client_sends_slide_and_keep_only_when_on():
    assert "slide" not in request_params(GenerationConfig())
    sent = request_params(GenerationConfig(slide=True, keep=4))
    assert sent["slide"] is True and sent["keep"] == 4


def test_keep_must_leave_room_in_the_context(gpt64):
    eng = _engine(gpt64)
    ids = _prompt(gpt64)
    with pytest.raises(ParamError, match=r"keep must be less than the model's context \(64"):
        eng.budget_for(Request(ids, greedy(slide=True, keep=CONTEXT)))
    assert eng.prepare(Request(ids, greedy(slide=True, keep=CONTEXT - 1))).keep == CONTEXT - 1
    # The default head (the system prompt) is at most half the context.
    assert eng.prepare(Request(ids, greedy(slide=True), keep_tokens=60)).keep == CONTEXT // 2


# ------------------------------------------------------------------ the engine


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "hf"])
def test_a_64_token_gpt2_gives_200_tokens_with_slide(gpt64, fast):
    eng = _engine(gpt64, fast)
    ids = _prompt(gpt64)
    plain = eng.generate([Request(ids, greedy(max_new_tokens=200))])[0]
    assert plain.completion_tokens == CONTEXT - len(ids)  # stopped by the context ...
    assert plain.finish_reason == "length" and plain.context_full  # ... and says so
    assert plain.slides == 0

    slid = eng.generate([Request(ids, greedy(max_new_tokens=200, slide=True))])[0]
    assert slid.completion_tokens == 200 and slid.finish_reason == "length"
    assert not slid.context_full
    assert slid.token_ids[: plain.completion_tokens] == plain.token_ids
    # The policy: at CONTEXT + 1 tokens the window keeps its newest half (32), so
    # every 33 tokens one slide drops 33.
    total, window, slides = len(ids) + 200, CONTEXT + 1, 0
    while window <= total:
        slides += 1
        window += slide_drop(CONTEXT + 1, 0, CONTEXT)
    assert (slid.slides, slid.slid_tokens) == (slides, 33 * slides)
    assert slid.to_dict()["slid_tokens"] == slid.slid_tokens


def test_a_reply_that_ends_first_neither_slides_nor_is_cut(gpt64):
    eng = _engine(gpt64)
    ids = _prompt(gpt64)
    short = eng.generate([Request(ids, greedy(max_new_tokens=20, slide=True))])[0]
    assert short.completion_tokens == 20 and short.slides == 0 and not short.context_full
    exact = eng.generate([Request(ids, greedy(max_new_tokens=CONTEXT - len(ids)))])[0]
    assert exact.finish_reason == "length" and not exact.context_full  # what was asked


@pytest.mark.parametrize("keep", [0, 20])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "hf"])
def test_after_a_slide_the_logits_are_a_fresh_forward_over_the_window(gpt64, fast, keep):
    """The window after the first slide, given as a prompt to a fresh request: the same
    next tokens with the same logprobs (top 5 too) until the window fills again."""
    eng = _engine(gpt64, fast)
    ids = _prompt(gpt64) * 2  # 20 tokens: a head of 20 spans a cached block and a part
    cfg = greedy(max_new_tokens=120, slide=True, keep=keep)
    slid = eng.generate([Request(ids, cfg, logprobs=5)])[0]
    assert slid.slides >= 2
    full = ids + slid.token_ids
    at = CONTEXT + 1  # tokens when the first slide happened
    drop = slide_drop(at, keep, CONTEXT)
    window = full[:keep] + full[keep + drop : at]
    done = at - len(ids)  # reply tokens before the slide
    fresh = eng.generate([Request(window, greedy(), logprobs=5)])[0]
    # Without slide the fresh request stops where the window is full: the slid one
    # had sampled the same tokens from the same logits up to there.
    assert fresh.context_full and fresh.completion_tokens == CONTEXT - len(window)
    n = fresh.completion_tokens
    assert slid.token_ids[done : done + n] == fresh.token_ids
    got, want = slid.logprobs[done : done + n], fresh.logprobs
    if _exact(gpt64) or not fast:
        assert got == want  # bit-identical: the window was computed from scratch
    else:
        for a, b in zip(got, want, strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_sliding_is_the_same_alone_and_in_a_crowd(gpt64):
    if not _exact(gpt64):
        pytest.skip("no C compiler: the torch path is not batch-invariant")
    eng = _engine(gpt64)
    prompts = [gpt64.tokenizer.encode(f"Client {i} asks {'why ' * i}") for i in range(6)]
    cfgs = [greedy(max_new_tokens=90 + 7 * i, slide=True, keep=i) for i in range(6)]
    alone = [eng.generate([Request(p, c)])[0].token_ids for p, c in zip(prompts, cfgs, strict=True)]
    crowd = eng.generate([Request(p, c) for p, c in zip(prompts, cfgs, strict=True)])
    assert [c.token_ids for c in crowd] == alone
    assert all(c.slides for c in crowd)


def test_penalties_see_the_whole_reply_after_a_slide(gpt64):
    req = Request([5, 6, 7, 8], greedy(slide=True))
    seq = Sequence(0, req, 100, gpt64.tokenizer)
    for t in (9, 10, 11, 12, 13):
        seq.append(t)
    seq.keep = 2
    seq.slide(3)
    assert seq.tokens == [5, 6, 10, 11, 12, 13]  # the window the model sees, from position 0
    assert seq.history == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert seq.prompt_ids == [5, 6, 7, 8] and seq.generated == [9, 10, 11, 12, 13]
    assert (seq.slides, seq.slid_tokens) == (1, 3)


def test_no_repeat_ngram_blocks_repeats_of_tokens_the_window_dropped(gpt64):
    eng = _engine(gpt64)
    ids = _prompt(gpt64)
    cfg = greedy(max_new_tokens=200, slide=True, no_repeat_ngram_size=3)
    c = eng.generate([Request(ids, cfg)])[0]
    assert c.completion_tokens == 200 and c.slides >= 3
    full = ids + c.token_ids
    grams = [tuple(full[i : i + 3]) for i in range(len(full) - 2)]
    assert len(set(grams)) == len(grams)  # none repeated, however long ago it was


def test_prompt_logprobs_are_scored_once_though_the_window_slides(gpt64):
    eng = _engine(gpt64)
    ids = _prompt(gpt64)
    cfg = greedy(max_new_tokens=100, slide=True)
    scored = eng.generate([Request(ids, cfg, prompt_logprobs=2, logprobs=0)])[0]
    plain = eng.generate([Request(ids, cfg)])[0]
    assert scored.slides and len(scored.prompt_logprobs) == len(ids)
    assert len(scored.logprobs) == 100 and scored.token_ids == plain.token_ids


def test_the_system_prompt_is_the_head_a_chat_keeps(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")
    msgs = [Message("system", "You are terse."), Message("user", "Hi")]
    plan = plan_request(lm.format, msgs, lm.info.context_length, greedy(slide=True))
    ids = plan.request.prompt_ids
    head = lm.format.encode(msgs[:1], add_generation_prompt=False).input_ids
    assert plan.request.keep_tokens == len(head) > 0 and ids[: len(head)] == head
    assert system_head(lm.format, msgs[1:], ids) == 0
    no_slide = plan_request(lm.format, msgs, lm.info.context_length, greedy())
    assert no_slide.request.keep_tokens is None  # only looked for when sliding
    assert Engine.shared(lm).prepare(plan.request).keep == len(head)


# ------------------------------------------------------------------ the CLI


def test_chat_says_when_the_context_is_full_and_slides_with_the_flag(gpt64_dir, capsys):
    argv = ["chat", "--model", str(gpt64_dir), "-t", "0", "--max-new-tokens", "200"]
    argv += ["--logit-bias", "0:-100", "--no-log", "--plain"]
    code, out, err = run(argv, capsys, "Hello there\n")
    assert code == 0, err
    assert "the context (64 tokens) is full: the reply stopped at" in err
    assert "--slide" in err
    code, out, err = run([*argv, "--slide", "--keep", "2"], capsys, "Hello there\n")
    assert code == 0, err
    assert "is full" not in err and "the reply went past the context" in err
    code, out, err = run([*argv, "--slide", "--keep", "64"], capsys, "Hello there\n")
    assert code != 0 and "--keep must be less than the model's context (64" in err


def test_chat_transcript_records_the_slide(gpt64_dir, capsys, tmp_path):
    path = tmp_path / "t.jsonl"
    argv = ["chat", "--model", str(gpt64_dir), "-t", "0", "--max-new-tokens", "150"]
    argv += ["--logit-bias", "0:-100", "--no-log", "--slide", "-o", str(path)]
    code, _, err = run(argv, capsys, "Hello there\n")
    assert code == 0, err
    reply = [json.loads(line) for line in path.read_text().splitlines()][-1]
    assert reply["completion_tokens"] == 150 and reply["slid_tokens"] > 0
    assert reply["params"]["slide"] is True


def test_generate_notes_full_contexts_and_rows_record_slides(gpt64_dir, capsys, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("Hello there\nHow are you\n")
    base = ["generate", str(inp), "--model", str(gpt64_dir), "-t", "0", "--no-progress"]
    base += ["--max-new-tokens", "120", "--logit-bias", "0:-100"]
    code, _, err = run([*base, "-o", str(tmp_path / "a.jsonl")], capsys)
    assert code == 0, err
    assert "2 replies stopped because the model's context (64 tokens) was full" in err
    assert "--slide" in err
    code, _, err = run([*base, "-o", str(tmp_path / "b.jsonl"), "--slide"], capsys)
    assert code == 0, err
    assert "was full" not in err
    rows = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["completion_tokens"] for r in rows] == [120, 120]
    assert all(r["slid_tokens"] > 0 and r["params"]["slide"] for r in rows)


# ------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def server64(gpt64):
    with ServerThread(create_app(gpt64, model_id="tiny64", limits=Limits(max_tokens=300))) as srv:
        yield srv


def _chat(server, **kw) -> httpx.Response:
    body = {
        "model": "tiny64",
        "messages": [{"role": "user", "content": "Hello there"}],
        "temperature": 0,
        "max_tokens": 150,
        "logit_bias": {"0": -100},
        **kw,
    }
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def test_the_server_slides_when_asked_and_says_so_on_the_choice(server64):
    plain = _chat(server64).json()
    assert plain["usage"]["completion_tokens"] < 150
    assert plain["choices"][0]["finish_reason"] == "length"
    assert "slid_tokens" not in plain["choices"][0]
    slid = _chat(server64, slide=True, keep=3).json()
    assert slid["usage"]["completion_tokens"] == 150
    choice = slid["choices"][0]
    assert choice["finish_reason"] == "length" and choice["slid_tokens"] > 0
    text = httpx.post(
        server64.url + "/v1/completions",
        json={
            "model": "tiny64",
            "prompt": "Hi",
            "max_tokens": 100,
            "temperature": 0,
            "logit_bias": {"0": -100},
            "slide": True,
        },
        timeout=120,
    ).json()
    assert text["usage"]["completion_tokens"] == 100 and text["choices"][0]["slid_tokens"] > 0


def test_the_last_streamed_chunk_carries_the_slide(server64):
    with httpx.stream(
        "POST",
        server64.url + "/v1/chat/completions",
        json={
            "model": "tiny64",
            "messages": [{"role": "user", "content": "Hello"}],
            "temperature": 0,
            "max_tokens": 100,
            "logit_bias": {"0": -100},
            "slide": True,
            "stream": True,
        },
        timeout=120,
    ) as r:
        chunks = [
            json.loads(line[6:])
            for line in r.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    assert last["choices"][0]["slid_tokens"] > 0


def test_the_server_refuses_a_bad_keep_naming_it(server64):
    for keep, why in ((-1, "keep must be >= 0"), (64, "keep must be less than")):
        r = _chat(server64, slide=True, keep=keep)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "keep" and why in err["message"]
    r = _chat(server64, slide="yes")
    assert r.status_code == 400 and r.json()["error"]["param"] == "slide"


def test_a_remote_chat_sends_slide_and_hears_that_it_slid(server64):
    from chatforge.remote import RemoteSession

    cfg = greedy(max_new_tokens=120, slide=True, logit_bias=NO_EOS)
    chat = RemoteSession(server64.url + "/v1", "tiny64", config=cfg)
    reply = chat.send("Hello there")
    assert reply.completion_tokens == 120 and reply.slid_tokens > 0
