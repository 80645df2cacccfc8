"""One error type (ParamError) shown as a flag or an API field, and bugs shown as bugs."""

from __future__ import annotations

import pickle

import pytest

from chatforge.cli.app import main
from chatforge.cli.options import flag_for, user_message
from chatforge.errors import ChatforgeError, InputError, ParamError
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
