"""Text models used as text (issue 24 item 1) and unconditional generation (item 3).

A model trained on a text corpus records the ``text`` format; ``chat``, ``generate``,
``eval``, ``/v1/completions`` and the chat route then continue prompts as plain text,
with the tokens the engine gives for the raw prompt. An empty prompt starts from the
model's start token (BOS / ``<sep>`` / EOS, as its format says).
"""

from __future__ import annotations

import json

import pytest

from chatforge.cli.app import main
from chatforge.conversation import (
    ChatTemplateFormat,
    EosFormat,
    Message,
    SepFormat,
    TextFormat,
    detect_format,
    ensure_sep_token,
    get_format,
)
from chatforge.generation.config import GenerationConfig
from chatforge.generation.plan import plan_request
from cli_helpers import run
from conftest import TINY_TOKENIZER

LINES = [
    "last night i dreamt of a quiet green sea.",
    "the old cat sleeps on the warm red mat.",
    "we walked to the market to buy fresh bread.",
]
PROMPT = "the old cat sleeps"
N = 10  # reply tokens in the CLI and server tests


def _ids(tok, text: str) -> list[int]:
    return list(tok.encode(text))


# ------------------------------------------------------------------ the format


def test_text_format_is_the_growing_text(tiny_tokenizer) -> None:
    fmt = get_format("text", tiny_tokenizer)
    assert isinstance(fmt, TextFormat) and detect_format(tiny_tokenizer, "text") == "text"
    msgs = [
        Message("user", "last night"),
        Message("assistant", " i dreamt"),
        Message("user", "of a sea"),
    ]
    # A reply continues the text; the next user line goes on a new line.
    assert TextFormat.text(msgs) == "last night i dreamt\nof a sea"
    assert fmt.encode(msgs).input_ids == _ids(tiny_tokenizer, "last night i dreamt\nof a sea")
    assert fmt.encode(msgs).token_type_ids is None
    assert TextFormat.text([Message("user", "a\n"), Message("user", "b")]) == "a\nb"
    assert TextFormat.text([Message("system", "notes"), Message("user", "x")]) == "notes\nx"
    assert fmt.stop_token_ids() == {tiny_tokenizer.eos_token_id}
    assert fmt.stop_strings() == ("\n\n",)
    ids, types, mask = fmt.encode_for_training(msgs)
    assert types is None and len(ids) == len(mask) and ids[-1] == tiny_tokenizer.eos_token_id
    reply = _ids(tiny_tokenizer, " i dreamt")
    first = _ids(tiny_tokenizer, "last night")
    assert ids[len(first) : len(first) + len(reply)] == reply
    assert mask[len(first) : len(first) + len(reply)] == [True] * len(reply)
    assert not any(mask[: len(first)]) and mask[-1] is False  # a user line ends the text


def test_start_token_of_each_format(tiny_tokenizer, tiny_chat_tokenizer) -> None:
    eos = tiny_tokenizer.eos_token_id
    assert TextFormat(tiny_tokenizer).start().input_ids == [tiny_tokenizer.bos_token_id]
    assert EosFormat(tiny_tokenizer).start().input_ids == [eos]
    assert ChatTemplateFormat(tiny_chat_tokenizer).start().input_ids == [
        tiny_chat_tokenizer.bos_token_id
    ]
    sep = ensure_sep_token(tiny_tokenizer)
    start = SepFormat(tiny_tokenizer).start()
    assert (start.input_ids, start.token_type_ids, start.reply_token_type) == ([sep], [0], 0)
    # an empty text is the start token, not an empty prompt
    assert TextFormat(tiny_tokenizer).encode([Message("user", "")]).input_ids == [
        tiny_tokenizer.bos_token_id
    ]


def test_plan_request_empty_prompt_and_format_stops(tiny_tokenizer, tiny_chat_tokenizer) -> None:
    cfg = GenerationConfig(temperature=0, max_new_tokens=5, stop=("END",))
    for fmt in (EosFormat(tiny_tokenizer), ChatTemplateFormat(tiny_chat_tokenizer)):
        for msgs in ([Message("user", "")], [Message("user", "  ")], []):
            req = plan_request(fmt, msgs, 128, cfg).request
            assert req.prompt_ids == fmt.start().input_ids, (fmt.name, msgs)
            assert req.max_new_tokens == 5 and req.config.stop == ("END",)
    # sep and eos render no system prompt: an empty user turn after one is still empty
    eos = EosFormat(tiny_tokenizer)
    msgs = [Message("system", "be kind"), Message("user", "")]
    assert plan_request(eos, msgs, 128, cfg, drop_history=False).prompt_tokens == 1
    chat = ChatTemplateFormat(tiny_chat_tokenizer)  # ... a chat template renders it
    assert plan_request(chat, msgs, 128, cfg).prompt_tokens > 1
    text = plan_request(TextFormat(tiny_tokenizer), [Message("user", "hi")], 128, cfg).request
    assert text.config.stop == ("END", "\n\n") and text.prompt_ids == _ids(tiny_tokenizer, "hi")


# ------------------------------------------------------------------ a text model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "dreams.txt"
    path.write_text("\n".join(LINES * 30) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, corpus):
    """`chatforge train --init gpt2 --tokenizer tok --data dreams.txt` (a few steps)."""
    out = tmp_path_factory.mktemp("runs") / "gpt2-dreams"
    argv = ["train", "--init", "gpt2", "--tokenizer", str(TINY_TOKENIZER), "--data", str(corpus)]
    argv += ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--context", "64"]
    argv += ["--max-steps", "8", "--batch-size", "4", "--lr", "3e-3", "--precision", "fp32"]
    assert main([*argv, "-q", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def text_lm(text_model):
    from chatforge import load_model

    return load_model(str(text_model))


def _engine_text(lm, prompt_ids, stop=("\n\n",), n=N, **kw) -> str:
    """What the engine gives for these raw prompt tokens, greedy (or as ``kw`` says)."""
    from chatforge.generation.engine import Engine
    from chatforge.generation.types import Request

    cfg = GenerationConfig(temperature=0, max_new_tokens=n, stop=stop, **kw)
    return Engine.shared(lm).generate([Request(list(prompt_ids), cfg)])[0].text


def test_a_text_corpus_model_records_and_loads_the_text_format(text_model, text_lm) -> None:
    meta = json.loads((text_model / "chatforge.json").read_text())
    assert meta["prompt_format"] == "text"  # was "sep": a format the model never saw
    assert text_lm.info.prompt_format == "text" and isinstance(text_lm.format, TextFormat)
    assert "<sep>" not in text_lm.tokenizer.get_vocab()


def test_chat_continues_the_text_as_the_engine_does(text_model, text_lm, capsys) -> None:
    argv = ["chat", "--model", str(text_model), "--prompt-file", "-", "--no-log", "--plain"]
    argv += ["--preset", "precise", "--max-new-tokens", str(N)]
    code, out, err = run(argv, capsys, stdin=PROMPT + "\n")
    assert code == 0, err
    first = _engine_text(text_lm, _ids(text_lm.tokenizer, PROMPT))
    assert first.strip() and out == first + "\n"
    # two lines: one growing text, the second line on a new line after the first reply
    code, out, err = run(argv, capsys, stdin=f"{PROMPT}\nwe walked\n")
    assert code == 0, err
    grown = f"{PROMPT}{first}\nwe walked"
    second = _engine_text(text_lm, _ids(text_lm.tokenizer, grown))
    assert out == first + "\n" + second + "\n"


def test_generate_continues_the_text_and_an_empty_prompt_starts_fresh(
    text_model, text_lm, tmp_path, capsys
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": PROMPT}) + "\n" + json.dumps({"text": ""}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(src), "-o", str(out), "--model", str(text_model), "--no-progress"]
    argv += ["--preset", "precise", "--max-new-tokens", str(N)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] for r in rows] == [None, None]  # the empty prompt was an error row
    assert rows[0]["output"] == _engine_text(text_lm, _ids(text_lm.tokenizer, PROMPT))
    assert rows[1]["output"] == _engine_text(text_lm, text_lm.format.start().input_ids)
    assert rows[1]["output"].strip()


def test_generate_into_a_txt_file_continues_each_line(text_model, text_lm, tmp_path, capsys):
    # bot_wcorpus.py --prompt_file prompts.txt --output_file out.txt: one prompt a line in,
    # each prompt with its continuation out; the rows (resume, settings) kept beside it.
    prompts = ["last night i dreamt", "the sea was"]
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.txt"
    argv = ["generate", str(src), "-o", str(out), "--model", str(text_model), "--no-progress"]
    argv += ["--preset", "precise", "--max-new-tokens", str(N)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    rows_file = tmp_path / "out.txt.rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    want = [p + _engine_text(text_lm, _ids(text_lm.tokenizer, p)) for p in prompts]
    assert out.read_text() == "\n\n".join(w.strip("\n") for w in want) + "\n"
    # A rerun resumes from the rows: nothing to do, the text is the same.
    before = out.read_text()
    code, _, err = run(argv, capsys)
    assert code == 0 and "already have a row" in err, err
    assert out.read_text() == before


def test_server_completions_and_chat_route_on_a_text_model(text_lm) -> None:
    import httpx

    from chatforge.server import create_app
    from serverkit import ServerThread

    with ServerThread(create_app(text_lm, model_id="dreams")) as srv:
        body = {"model": "dreams", "prompt": PROMPT, "max_tokens": N, "temperature": 0}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        raw = _engine_text(text_lm, _ids(text_lm.tokenizer, PROMPT), stop=())
        assert r.json()["choices"][0]["text"] == raw
        # "" starts from the start token (was a 400); seeded samples repeat
        r = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": ""}, timeout=60)
        assert r.status_code == 200, r.text
        start = text_lm.format.start().input_ids
        assert r.json()["choices"][0]["text"] == _engine_text(text_lm, start, stop=())
        seeded = {**body, "prompt": "", "temperature": 1.0, "seed": 5}
        a = httpx.post(srv.url + "/v1/completions", json=seeded, timeout=60).json()
        b = httpx.post(srv.url + "/v1/completions", json=seeded, timeout=60).json()
        assert a["choices"][0]["text"].strip() and a["choices"] == b["choices"]
        # The chat route continues the messages' text (plain text, blank line stops).
        chat = {
            "model": "dreams",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": N,
            "temperature": 0,
        }
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        want = _engine_text(text_lm, _ids(text_lm.tokenizer, PROMPT))
        assert r.json()["choices"][0]["message"]["content"] == want


def test_eval_reports_the_perplexity_of_a_text_corpus(text_model, corpus, capsys) -> None:
    argv = ["eval", "--model", str(text_model), "--data", str(corpus), "--replies", "2"]
    code, out, err = run([*argv, "--max-new-tokens", "4", "--json"], capsys)
    assert code == 0, err  # was: "--data must hold conversations"
    res = json.loads(out)["models"][0]
    assert res["perplexity"] > 1 and res["conversations"] == 1
    assert res["eval_tokens"] > 100 and res["replies"] == 2
    assert res["samples"][0]["prompt"] == "last night i dreamt"


def test_format_text_flag_on_any_model(tiny_llama_dir, tmp_path, capsys) -> None:
    from chatforge import load_model

    lm = load_model(str(tiny_llama_dir), format="text")
    assert lm.info.prompt_format == "text" and isinstance(lm.format, TextFormat)
    with pytest.raises(ValueError, match="chat_template, sep, eos, text"):
        load_model(str(tiny_llama_dir), format="xml")
    base = ["--model", str(tiny_llama_dir), "--preset", "precise", "--max-new-tokens", str(N)]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": PROMPT}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(src), "-o", str(out), "--no-progress", "--format", "text", *base]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    row = json.loads(out.read_text())
    assert row["output"] == _engine_text(lm, _ids(lm.tokenizer, PROMPT))
    argv = ["chat", "--prompt-file", "-", "--no-log", "--plain", "--format", "text", *base]
    code, text, err = run(argv, capsys, stdin=PROMPT + "\n")
    assert code == 0, err
    assert text == row["output"] + "\n"
    bad = ["chat", "--prompt-file", "-", "--no-log", "--format", "xml", *base]
    code, _, err = run(bad, capsys, stdin="x\n")
    assert code == 2 and "--format must be one of chat_template, sep, eos, text" in err


def test_lora_on_a_text_corpus_records_the_text_format(tiny_llama_dir, corpus, tmp_path) -> None:
    from chatforge import load_model
    from chatforge.training.trainer import train
    from training_helpers import tiny_config

    out = tmp_path / "lora"
    train(tiny_config(corpus, out, tiny_llama_dir, lora=True, max_steps=2))
    assert (out / "adapter_config.json").is_file()
    assert json.loads((out / "chatforge.json").read_text())["prompt_format"] == "text"
    assert load_model(str(out)).info.prompt_format == "text"


# ------------------------------------------------------------------ unconditional


def test_chat_empty_line_samples_from_the_start_token(tiny_gpt2_dir, capsys) -> None:
    from chatforge import load_model

    lm = load_model(str(tiny_gpt2_dir))  # eos format: starts from EOS
    start = lm.format.start().input_ids
    assert start == [lm.tokenizer.eos_token_id]
    argv = ["chat", "--model", str(tiny_gpt2_dir), "--prompt-file", "-", "--no-log", "--plain"]
    code, out, err = run([*argv, "--preset", "precise", "--max-new-tokens", "8"], capsys, "\n")
    assert code == 0, err
    assert out.strip() and out == _engine_text(lm, start, stop=(), n=8) + "\n"  # was: nothing
    seeded = [*argv, "--temperature", "1", "--seed", "3", "--max-new-tokens", "8"]
    code, a, err = run(seeded, capsys, "\n")
    assert code == 0, err
    code, b, err = run(seeded, capsys, "\n")
    assert code == 0 and a.strip() and a == b


def test_python_api_empty_prompt(tiny_llama_dir) -> None:
    from chatforge import ChatSession, load_model

    lm = load_model(str(tiny_llama_dir))
    cfg = GenerationConfig(temperature=0, max_new_tokens=8)
    reply = ChatSession(lm, cfg).send("")
    assert reply.prompt_tokens == 1
    assert reply.text == _engine_text(lm, [lm.tokenizer.bos_token_id], stop=(), n=8)
