"""Logprobs, echo and token-id prompts through the API (what eval harnesses send)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from chatforge import load_model
from chatforge.server import create_app
from serverkit import ServerThread


@pytest.fixture(scope="module")
def fp32(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")


@pytest.fixture(scope="module")
def server(fp32):
    with ServerThread(create_app(fp32, model_id="tiny")) as srv:
        yield srv


def _post(server, route: str, **body) -> httpx.Response:
    return httpx.post(server.url + route, json={"model": "tiny", **body}, timeout=60)


def _join(tokens: list[str]) -> str:
    """Legacy ``tokens`` back into text (``bytes:\\xNN`` labels are bytes, not UTF-8 alone)."""
    raw = b"".join(
        bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
        for t in tokens
    )
    return raw.decode("utf-8", "replace")


def _ref_logprobs(lm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)


def test_scoring_a_continuation_like_lm_eval(server, fp32):
    """echo + max_tokens 0 + logprobs on token ids: lm-eval's loglikelihood request."""
    context = fp32.tokenizer.encode("The capital of France is")
    choices = [fp32.tokenizer.encode(" Paris"), fp32.tokenizer.encode(" a big dog")]
    prompts = [context + c for c in choices]
    r = _post(server, "/v1/completions", prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert r.status_code == 200, r.text
    for choice, ids, cont in zip(r.json()["choices"], prompts, choices, strict=True):
        assert ids[len(context) :] == cont
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["tokens"]) == len(ids) == len(lp["text_offset"])
        assert choice["text"] == fp32.tokenizer.decode(ids)
        ref = _ref_logprobs(fp32, ids)
        ours = sum(lp["token_logprobs"][len(context) :])
        theirs = sum(float(ref[i - 1, ids[i]]) for i in range(len(context), len(ids)))
        assert abs(ours - theirs) < 1e-3
        for i in range(1, len(ids)):  # the greedy check lm-eval does with top_logprobs
            ((best, best_lp),) = lp["top_logprobs"][i].items()
            assert abs(best_lp - float(ref[i - 1].max())) < 1e-3


def test_generated_tokens_logprobs_and_echo(server, fp32):
    r = _post(
        server, "/v1/completions", prompt="Hello there", max_tokens=5, temperature=0, logprobs=2
    )
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == r.json()["usage"]["completion_tokens"] == 5
    assert all(len(t) <= 2 for t in lp["top_logprobs"])
    # The text ends before a character the budget cut in two (no U+FFFD at the end).
    assert _join(lp["tokens"]).rstrip("\ufffd") == choice["text"]
    echoed = _post(
        server, "/v1/completions", prompt="Hello there", max_tokens=5, temperature=0, echo=True
    ).json()["choices"][0]
    assert echoed["text"] == "Hello there" + choice["text"] and echoed["logprobs"] is None


def test_chat_logprobs_with_the_openai_sdk(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    msgs = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.logprob <= 0 and bytes(c.bytes).decode() == c.token
    streamed = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    pieces = [
        e
        for ch in streamed
        if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content
    ]
    assert [(p.token, round(p.logprob, 5)) for p in pieces] == [
        (c.token, round(c.logprob, 5)) for c in content
    ]
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_streamed_completion_logprobs_and_echo(server):
    body = {
        "model": "tiny",
        "prompt": "Hello there",
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": 1,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    tokens = [
        t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]
    ]
    assert len(tokens) == 4
    body.update(echo=True, logprobs=None)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        first = next(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data:"))
    assert first["choices"][0]["text"] == "Hello there"


def _sse_events(server, route: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + route, json=body, timeout=60) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_a_stop_token_that_ends_the_reply_is_a_generated_token(server, fp32):
    """echo + logprobs 1 + max_tokens 1 (lm-eval's loglikelihood request) when the token
    generated is EOS: like any generated token it is the last logprobs entry, with the
    model's logprob, and counts in completion_tokens; it adds no text. (It was left out,
    and lm-eval, which drops the last entry, lost a continuation token.)"""
    tok = fp32.tokenizer
    eos = tok.eos_token_id
    assert tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    ids = tok.encode("The capital of France is Paris")
    force = {"temperature": 0, "logprobs": 1, "logit_bias": {str(eos): 100}}
    r = _post(server, "/v1/completions", prompt=ids, max_tokens=1, echo=True, **force)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and usage["completion_tokens"] == 1
    assert choice["text"] == tok.decode(ids)  # the echoed prompt, nothing generated
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids) + 1
    assert lp["tokens"][-1] == "<|im_end|>" and lp["text_offset"][-1] == len(choice["text"])
    ref = _ref_logprobs(fp32, ids)
    assert abs(lp["token_logprobs"][-1] - float(ref[-1, eos])) < 1e-3  # before the bias
    ((best, best_lp),) = lp["top_logprobs"][-1].items()
    assert abs(best_lp - float(ref[-1].max())) < 1e-3
    # What lm-eval sums for the continuation " Paris": everything but the last entry.
    cont = len(tok.encode("The capital of France is"))
    ours = sum(lp["token_logprobs"][cont:-1])
    assert abs(ours - sum(float(ref[i - 1, ids[i]]) for i in range(cont, len(ids)))) < 1e-3

    # Without echo, streamed or not (and a larger budget: EOS still ends it first).
    plain = _post(server, "/v1/completions", prompt=ids, max_tokens=5, **force).json()
    (choice,) = plain["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] == ["<|im_end|>"] and choice["logprobs"]["text_offset"] == [
        0
    ]
    assert choice["logprobs"]["token_logprobs"] == [lp["token_logprobs"][-1]]
    assert plain["usage"]["completion_tokens"] == 1
    body = {"model": "tiny", "prompt": ids, "max_tokens": 5, "stream": True, **force}
    events = _sse_events(
        server, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    pieces = [c for e in events for c in e["choices"]]
    assert "".join(c["text"] for c in pieces) == ""
    streamed = [c["logprobs"] for c in pieces if c["logprobs"]]
    assert [t for s in streamed for t in s["tokens"]] == ["<|im_end|>"]
    assert [t for s in streamed for t in s["token_logprobs"]] == [lp["token_logprobs"][-1]]
    assert [c["finish_reason"] for c in pieces if c["finish_reason"]] == ["stop"]
    assert events[-1]["usage"]["completion_tokens"] == 1

    # Chat: the stop token is the reply's last logprobs entry and counts in usage, but
    # its text is not in the reply.
    msgs = [{"role": "user", "content": "Hello there"}]
    force = {"temperature": 0, "logprobs": True, "top_logprobs": 2, "logit_bias": {str(eos): 100}}
    r = _post(server, "/v1/chat/completions", messages=msgs, max_tokens=5, **force).json()
    (choice,) = r["choices"]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop"
    (entry,) = choice["logprobs"]["content"]
    assert entry["token"] == "<|im_end|>" and entry["bytes"] == list(b"<|im_end|>")
    assert entry["logprob"] < 0 and len(entry["top_logprobs"]) == 2
    assert r["usage"]["completion_tokens"] == 1
    body = {"model": "tiny", "messages": msgs, "max_tokens": 5, "stream": True, **force}
    events = _sse_events(
        server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    pieces = [c for e in events for c in e["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in pieces) == ""
    content = [t for c in pieces if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert content == [entry]
    assert events[-1]["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, "echo"),
        ("/v1/completions", {"prompt": [1, 2, 10**7]}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
        ),
    ],
)
def test_bad_logprob_requests_are_400s_naming_the_field(server, route, body, param):
    r = _post(server, route, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tokenizer_routes(server, fp32):
    r = _post(server, "/tokenize", prompt="Hello there")
    assert r.status_code == 200
    ids = fp32.tokenizer.encode("Hello there")
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": 128}
    msgs = [{"role": "user", "content": "Hello there"}]
    r = _post(server, "/tokenize", messages=msgs)
    from chatforge import Message

    assert r.json()["tokens"] == fp32.format.encode([Message("user", "Hello there")]).input_ids
    back = _post(server, "/detokenize", tokens=ids).json()["prompt"]
    assert back == fp32.tokenizer.decode(ids)
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["max_model_len"] == 128 and info["vocab_size"] >= len(fp32.tokenizer)
    assert _post(server, "/detokenize", tokens=[10**7]).json()["error"]["param"] == "tokens"
    assert _post(server, "/tokenize", prompt="a", messages=msgs).status_code == 400
    assert _post(server, "/tokenize", model="other", prompt="a").status_code == 404


def test_logit_bias_and_penalties_through_the_api(server):
    msgs = [{"role": "user", "content": "Hello there"}]
    r = _post(
        server,
        "/v1/chat/completions",
        messages=msgs,
        max_tokens=4,
        temperature=0,
        logit_bias={"9": 100},
        logprobs=True,
    )
    assert [c["token"] for c in r.json()["choices"][0]["logprobs"]["content"]] == [
        httpx.post(server.url + "/detokenize", json={"tokens": [9]}).json()["prompt"]
    ] * 4
    ok = _post(
        server,
        "/v1/chat/completions",
        messages=msgs,
        max_tokens=4,
        presence_penalty=1.5,
        frequency_penalty=-0.5,
    )
    assert ok.status_code == 200
    for body, param in [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"9": 150}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ]:
        r = _post(server, "/v1/chat/completions", messages=msgs, max_tokens=2, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_served_model_names(fp32):
    app = create_app(fp32, model_id="tiny", served_model_names=["bot-a", "bot-b"])
    with ServerThread(app) as srv:
        ids = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert ids == ["bot-a", "bot-b"]
        for name in ("bot-a", "bot-b", "tiny"):
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert httpx.post(srv.url + "/v1/chat/completions", json=body).status_code == 200
        body["model"] = "bot-c"
        assert httpx.post(srv.url + "/v1/chat/completions", json=body).status_code == 404


def _byte_label(raw: bytes) -> str:
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_completion_alternatives_that_are_byte_tokens_stay_distinct(server, fp32):
    """Byte tokens all decode alone to U+FFFD; they are labelled by bytes and not merged."""
    r = _post(
        server, "/v1/completions", prompt="Hello there", max_tokens=6, temperature=0, logprobs=3
    )
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    for top in lp["top_logprobs"]:
        assert len(top) == 3 and "\ufffd" not in top
        assert all(k.startswith("bytes:\\x") or "\ufffd" not in k for k in top)
    # With this seed some step's alternatives hold two byte tokens (once merged into one).
    assert any(sum(k.startswith("bytes:") for k in top) >= 2 for top in lp["top_logprobs"])
    assert "\ufffd" not in lp["tokens"]
    ids = r.json()["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == ids == len(lp["text_offset"])
    text = choice["text"]
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert 0 <= offset < len(text)
        if not token.startswith("bytes:"):
            assert text[offset:].startswith(token)
    # A byte token forced by logit_bias: labelled with its byte (id 95 is byte 0xA1).
    forced = _post(
        server,
        "/v1/completions",
        prompt="Hello there",
        max_tokens=2,
        temperature=0,
        logprobs=1,
        logit_bias={"95": 100},
    ).json()["choices"][0]["logprobs"]
    assert forced["tokens"] == ["bytes:\\xa1"] * 2 and forced["text_offset"] == [0, 1]


def test_text_offsets_of_characters_split_across_tokens(tiny_chat_tokenizer):
    from chatforge.server.logprobs import legacy_logprobs

    text = "héllo – wörld ✓<|im_end|>x"
    ids = tiny_chat_tokenizer.encode(text)
    lp = legacy_logprobs(tiny_chat_tokenizer, [(i, None) for i in ids], offset=3)
    assert tiny_chat_tokenizer.decode(ids) == text
    assert "bytes:\\xc3" in lp["tokens"] and "<|im_end|>" in lp["tokens"]
    pieces = [tiny_chat_tokenizer.decode([i]) for i in ids]
    for i, (token, piece, offset) in enumerate(
        zip(lp["tokens"], pieces, lp["text_offset"], strict=True)
    ):
        char = text[offset - 3]  # the character this token starts (or continues)
        if token.startswith("bytes:"):
            assert char.encode().find(bytes.fromhex(token[6:].replace("\\x", ""))) >= 0, i
        else:
            assert token == piece and text[offset - 3 :].startswith(token), i
    assert lp["text_offset"][-1] == 3 + len(text) - 1


class _StubTokenizer:
    """A SentencePiece-like vocabulary: byte tokens <0xNN>, and two tokens spelled "foo"."""

    pieces = {1: "foo", 2: "foo", 3: "bar", 4: "<0xE2>", 5: "<0x41>"}
    texts = {1: "foo", 2: "foo", 3: "bar", 4: "\ufffd", 5: "A"}

    def decode(self, ids, **kw):
        return "".join(self.texts[i] for i in ids)

    def convert_ids_to_tokens(self, i):
        return self.pieces[i]


def test_same_label_alternatives_are_all_kept_and_sentencepiece_bytes():
    from chatforge.generation.types import TokenLogprob
    from chatforge.server.logprobs import chat_logprobs, legacy_logprobs

    tok = _StubTokenizer()
    lp = TokenLogprob(4, -0.5, top=[(4, -0.5), (1, -1.0), (2, -2.0), (3, -3.0)])
    legacy = legacy_logprobs(tok, [(4, lp), (5, None)])
    assert legacy["tokens"] == ["bytes:\\xe2", "A"]
    # The better "foo" keeps its label; the worse one is not dropped but named by id.
    assert legacy["top_logprobs"][0] == {
        "bytes:\\xe2": -0.5,
        "foo": -1.0,
        "token_id:2": -2.0,
        "bar": -3.0,
    }
    assert legacy["text_offset"] == [0, 1]  # the lone 0xE2 decodes as one U+FFFD
    (chat,) = chat_logprobs(tok, [lp], top=3)
    assert chat["token"] == "bytes:\\xe2" and chat["bytes"] == [0xE2]
    assert [(t["token"], t["bytes"]) for t in chat["top_logprobs"]] == [
        ("bytes:\\xe2", [0xE2]),
        ("foo", list(b"foo")),
        ("foo", list(b"foo")),
    ]


def _two_token_character(fp32, msgs) -> str:
    """A two-byte character that greedy decoding writes as its two byte tokens when only
    those two are boosted (the lead must win the first step, the continuation the next),
    the one with the widest margins."""
    from chatforge import Message

    tok = fp32.tokenizer
    prompt = fp32.format.encode([Message(m["role"], m["content"]) for m in msgs]).input_ids
    first = _ref_logprobs(fp32, prompt)[-1]
    best: tuple[float, str] | None = None
    for char in map(chr, range(0x80, 0x800)):
        ids = tok.encode(char, add_special_tokens=False)
        if len(ids) != 2:
            continue
        lead, cont = ids
        after = _ref_logprobs(fp32, [*prompt, lead])[-1]
        margin = min(float(first[lead] - first[cont]), float(after[cont] - after[lead]))
        if best is None or margin > best[0]:
            best = (margin, char)
    assert best is not None and best[0] > 1e-2, best
    return best[1]


@pytest.mark.slow
def test_chat_bytes_are_the_tokens_real_bytes(server, fp32):
    msgs = [{"role": "user", "content": "Hello there"}]
    body = {"messages": msgs, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    forced = _post(server, "/v1/chat/completions", max_tokens=2, logit_bias={"95": 100}, **body)
    content = forced.json()["choices"][0]["logprobs"]["content"]
    assert fp32.tokenizer.convert_ids_to_tokens(95) == "\u00a1"  # byte 0xA1 in GPT-2's table
    assert [(c["token"], c["bytes"]) for c in content] == [("bytes:\\xa1", [0xA1])] * 2
    for c in content:
        for alt in c["top_logprobs"]:
            assert alt["token"] != "\ufffd" and alt["bytes"] != list("\ufffd".encode())
            if alt["token"].startswith("bytes:"):
                assert alt["token"] == _byte_label(bytes(alt["bytes"]))
            else:
                assert bytes(alt["bytes"]).decode() == alt["token"]
    # One character split over two byte tokens: the tokens' bytes join into the reply's.
    char = _two_token_character(fp32, msgs)
    lead, cont = fp32.tokenizer.encode(char, add_special_tokens=False)
    r = _post(
        server,
        "/v1/chat/completions",
        max_tokens=2,
        logit_bias={str(lead): 100, str(cont): 100},
        **body,
    )
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["message"]["content"] == char
    assert [c["token"] for c in content] == [
        _byte_label(char.encode()[:1]),
        _byte_label(char.encode()[1:]),
    ]
    assert b"".join(bytes(c["bytes"]) for c in content) == char.encode()
    # And an ordinary reply: the joined bytes decode (lone bytes as U+FFFD) to the reply.
    plain = _post(server, "/v1/chat/completions", max_tokens=8, **body).json()["choices"][0]
    joined = b"".join(bytes(c["bytes"]) for c in plain["logprobs"]["content"])
    assert joined.decode("utf-8", "replace") == plain["message"]["content"]
