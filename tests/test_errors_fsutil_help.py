"""One error type (ParamError) shown as a flag or an API field, bugs shown as bugs,
atomic file writes, and ``--help`` showing every default."""

from __future__ import annotations

import os
import pickle
import re

import pytest

from chatforge.cli.app import main
from chatforge.cli.options import flag_for, user_message
from chatforge.errors import ChatforgeError, InputError, ParamError
from chatforge.fsutil import atomic_file, atomic_path, atomic_write
from chatforge.generation.config import GenerationConfig
from chatforge.generation.processors import LogitBias
from chatforge.server.errors import APIError
from chatforge.server.schemas import ChatCompletionRequest, Limits, generation_config, parse

# ------------------------------------------------------------------ ParamError


def test_param_error_carries_param_and_reads_as_before():
    e = ParamError("top_p", "must be in (0, 1] (got 2.0)")
    assert isinstance(e, ValueError) and isinstance(e, ChatforgeError)
    assert isinstance(e, InputError)
    assert (e.param, e.message) == ("top_p", "must be in (0, 1] (got 2.0)")
    assert str(e) == "top_p must be in (0, 1] (got 2.0)"
    assert e.render("--top-p") == "--top-p must be in (0, 1] (got 2.0)"
    assert ParamError("json_schema", ": x.json is not JSON").render("f") == "f: x.json is not JSON"
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.param, str(copy)) == ("top_p", str(e))


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"top_p": 2.0}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"logit_bias": {3: 500}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
        ({"json_schema": {"type": "no-such-type"}}, "json_schema"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ],
)
def test_generation_config_raises_param_errors(kwargs, param):
    with pytest.raises(ParamError) as info:
        GenerationConfig(**kwargs)
    assert info.value.param == param
    assert str(info.value).startswith(param)


def test_set_param_and_processors_name_the_setting():
    with pytest.raises(ParamError) as info:
        GenerationConfig().set_param("top-k", "many")
    assert info.value.param == "top_k"
    with pytest.raises(ParamError) as info:
        LogitBias({99: 1.0}).validate(vocab_size=10)
    assert info.value.param == "logit_bias" and "outside this model's vocabulary" in str(info.value)


def test_train_config_raises_param_errors():
    from chatforge.training.config import TrainConfig

    with pytest.raises(ParamError) as info:
        TrainConfig(data=["d.jsonl"], output="o", model="m", lr=-1)
    assert info.value.param == "lr"
    with pytest.raises(ParamError) as info:
        TrainConfig(data=["d.jsonl"], output="o", init="gpt2")
    assert info.value.param == "tokenizer"


@pytest.mark.parametrize(
    ("param", "message", "shown"),
    [
        ("top_p", "must be in (0, 1]", "--top-p must be in (0, 1]"),
        ("max_new_tokens", "must be >= 1", "--max-new-tokens must be >= 1"),
        ("json_schema", ": f is not JSON", "--json-schema: f is not JSON"),
        ("packing", "must be a bool", "--no-packing must be a bool"),
        ("progress", "must be a bool", "--quiet must be a bool"),
    ],
)
def test_cli_names_the_flag(param, message, shown):
    assert user_message(ParamError(param, message)) == shown
    assert user_message(ChatforgeError("plain")) == "plain"
    assert flag_for("no_repeat_ngram_size") == "--no-repeat-ngram-size"


def test_cli_shows_a_param_error_as_its_flag(capsys, tmp_path):
    bad = tmp_path / "schema.json"
    bad.write_text("{not json")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    argv = ["generate", str(prompts), "-o", str(tmp_path / "o.jsonl"), "--json-schema", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --json-schema: {bad} is not valid JSON")
    assert len(err.strip().splitlines()) == 1
    assert main([*argv[:4], "--logit-bias", "7"]) == 2
    assert "error: --logit-bias takes ID:BIAS" in capsys.readouterr().err


def _chat(**body) -> ChatCompletionRequest:
    messages = [{"role": "user", "content": "hi"}]
    return parse(ChatCompletionRequest, {"model": "m", "messages": messages, **body})


def test_server_names_the_api_field():
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    with pytest.raises(APIError) as info:
        generation_config(_chat(response_format=schema), Limits())
    assert info.value.param == "response_format"
    assert str(info.value.message).startswith("response_format ")
    with pytest.raises(APIError) as info:
        generation_config(_chat(logit_bias={"5": 300}), Limits())
    assert info.value.param == "logit_bias"


def test_server_names_the_reply_length_field_the_request_used():
    from chatforge.server.schemas import param_error

    e = ParamError("max_new_tokens", "must be >= 1 (got 0)")
    assert param_error(e).param == "max_tokens"
    err = param_error(e, "max_completion_tokens")
    assert err.param == "max_completion_tokens"
    assert err.message == "max_completion_tokens must be >= 1 (got 0)"


# ------------------------------------------------------------------ bugs are bugs


def _boom(exc: BaseException):
    def build(*args, **kwargs):
        raise exc

    return build


def _train(tmp_path) -> list[str]:
    return ["train", "--model", "m", "--data", str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "o")]


@pytest.mark.parametrize("exc", [KeyError("weights"), ValueError("internal invariant broken")])
def test_an_unexpected_exception_is_shown_as_a_bug(exc, capsys, monkeypatch, tmp_path):
    import chatforge.training.config

    monkeypatch.setattr(chatforge.training.config, "TrainConfig", _boom(exc))
    assert main(_train(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and type(exc).__name__ in err
    assert "this is a bug in chatforge" in err.strip().splitlines()[-1]


def test_a_user_error_stays_one_line(capsys, monkeypatch, tmp_path):
    import chatforge.training.config

    monkeypatch.setattr(chatforge.training.config, "TrainConfig", _boom(ParamError("lr", "bad")))
    assert main(_train(tmp_path)) == 2
    assert capsys.readouterr().err == "error: --lr bad\n"


# ------------------------------------------------------------------ atomic_write


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "f.txt")


def test_atomic_write_writes_text_and_bytes(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    atomic_write(str(target), b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_atomic_write_makes_files_as_open_does(tmp_path):
    atomic_write(tmp_path / "f.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert os.stat(tmp_path / "f.txt").st_mode == os.stat(tmp_path / "plain.txt").st_mode


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_no_temp(failing, tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, "new content")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_an_exception_inside_atomic_file_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write("half of the new")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ --help


def _help(argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setenv("TERMINAL_WIDTH", "300")
    assert main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_generation_help_shows_the_defaults(command, capsys, monkeypatch):
    from chatforge.generation.config import DEFAULT_MAX_NEW_TOKENS, PRESETS

    text = _help([command], capsys, monkeypatch)
    balanced = PRESETS["balanced"]
    assert f"[default: {balanced['temperature']} (preset balanced)]" in text
    for name in ("top_p", "min_p", "repetition_penalty"):
        assert f"[default: {balanced[name]} (preset balanced)]" in text, name
    assert "default: 0.2 (preset balanced)" in text
    assert f"[default: {DEFAULT_MAX_NEW_TOKENS}" in text
    assert "<bool>" not in text


def test_train_help_shows_the_defaults(capsys, monkeypatch):
    from chatforge.training.config import TrainConfig
    from chatforge.training.model import DEFAULT_SCRATCH_CONTEXT, MAX_DEFAULT_CONTEXT

    text = _help(["train"], capsys, monkeypatch)
    assert "<bool>" not in text
    lr = re.search(r"--lr .*?\[default: ([^\]]*)\]", text).group(1)
    base = {"data": ["d"], "output": "o"}
    for kind, cfg in {
        "fine-tuning": TrainConfig(**base, model="m"),
        "--lora": TrainConfig(**base, model="m", lora=True),
        "--init gpt2": TrainConfig(**base, init="gpt2", tokenizer="t"),
    }.items():
        shown = re.search(rf"([0-9.e-]+) (?:with )?{re.escape(kind)}", lr).group(1)
        assert float(shown) == cfg.lr, kind
    context = re.search(r"--context .*?\[default: ([^\]]*)\]", text).group(1)
    assert str(MAX_DEFAULT_CONTEXT) in context and str(DEFAULT_SCRATCH_CONTEXT) in context
    assert re.search(r"--epochs .*?\[default: 1", text)


def test_no_command_shows_bool_metavars(capsys, monkeypatch):
    for argv in (["serve"], ["eval"], ["data", "inspect"], ["tokenizer", "train"], []):
        assert "<bool>" not in _help(argv, capsys, monkeypatch), argv


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "pack.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]
