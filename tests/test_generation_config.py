"""GenerationConfig: validation messages, greedy rules, reply budget, presets, /set parsing."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from chatforge.errors import ChatforgeError, ContextOverflowError
from chatforge.generation.config import DEFAULT_MAX_NEW_TOKENS, PRESETS, GenerationConfig


def test_defaults() -> None:
    cfg = GenerationConfig()
    assert cfg.temperature == 1.0  # neutral: the model's own distribution (OpenAI's default)
    assert cfg.top_k == 0
    assert cfg.top_p == 1.0
    assert cfg.min_p == 0.0
    assert cfg.repetition_penalty == 1.0
    assert cfg.no_repeat_ngram_size == 0
    assert cfg.max_new_tokens is None
    assert cfg.max_length is None
    assert cfg.stop == ()
    assert cfg.seed is None
    assert cfg.do_sample is None
    assert not cfg.greedy


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0 (got -1.0); use 0 for greedy"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"temperature": True}, "temperature must be a number"),
        ({"top_k": -3}, "top_k must be >= 0 (got -3); use 0 to disable it"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"top_p": 1.5}, "top_p must be in (0, 1] (got 1.5)"),
        ({"top_p": 0.0}, "top_p must be in (0, 1] (got 0.0)"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": 1.0}, "min_p must be in [0, 1) (got 1.0)"),
        ({"min_p": -0.1}, "min_p must be in [0, 1)"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0 (got 0.0); 1.0 disables it"),
        ({"repetition_penalty": math.inf}, "repetition_penalty must be a finite number"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be >= 0 (got -1)"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1 (got 0)"),
        ({"max_new_tokens": False}, "max_new_tokens must be an integer"),
        ({"max_length": -5}, "max_length must be >= 1 (got -5)"),
        ({"max_length": 10.0}, "max_length must be an integer"),
        ({"stop": ["ok", ""]}, "stop strings must not be empty"),
        ({"stop": [1]}, "stop must contain only strings"),
        ({"stop": 5}, "stop must be a string or a list"),
        ({"seed": -1}, "seed must be in [0, 2**64)"),
        ({"seed": "42"}, "seed must be an integer or None"),
        ({"do_sample": "yes"}, "do_sample must be True, False or None"),
    ],
)
def test_invalid_values_raise_with_the_parameter_name(changes: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        GenerationConfig(**changes)
    assert needle in str(info.value)
    # The same validation runs on copies.
    with pytest.raises(ValueError):
        GenerationConfig().replace(**changes)


def test_numbers_are_normalised() -> None:
    cfg = GenerationConfig(temperature=1, top_p=1, repetition_penalty=2)
    assert isinstance(cfg.temperature, float) and cfg.temperature == 1.0
    assert isinstance(cfg.top_p, float)
    assert isinstance(cfg.repetition_penalty, float)


def test_temperature_zero_is_greedy_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = GenerationConfig(temperature=0.0, top_p=0.9, top_k=5)
        assert cfg.greedy
        assert GenerationConfig(temperature=0, do_sample=True).greedy  # temperature 0 wins
        assert GenerationConfig.from_preset("precise").greedy


def test_do_sample_rules() -> None:
    assert not GenerationConfig(temperature=0.7).greedy
    assert GenerationConfig(temperature=0.7, do_sample=False).greedy
    assert not GenerationConfig(temperature=0.7, do_sample=True).greedy
    # do_sample stays "derived" across copies: raising the temperature turns sampling on.
    assert not GenerationConfig(temperature=0.0).replace(temperature=0.8).greedy


def test_stop_accepts_a_string_or_a_list() -> None:
    assert GenerationConfig(stop="\n\n").stop == ("\n\n",)
    assert GenerationConfig(stop=["a", "b"]).stop == ("a", "b")
    assert GenerationConfig(stop=None).stop == ()


def test_reply_budget_defaults_and_caps() -> None:
    assert GenerationConfig().reply_budget(10) == DEFAULT_MAX_NEW_TOKENS == 256
    assert GenerationConfig(max_new_tokens=20).reply_budget(10) == 20
    # max_length alone limits the reply: prompt + reply <= max_length.
    assert GenerationConfig(max_length=1000).reply_budget(10) == 990
    assert GenerationConfig(max_new_tokens=20, max_length=25).reply_budget(10) == 15
    assert GenerationConfig(max_new_tokens=20, max_length=100).reply_budget(10) == 20
    # The model's context caps everything.
    assert GenerationConfig().reply_budget(100, context_length=128) == 28
    assert GenerationConfig(max_new_tokens=5).reply_budget(100, context_length=128) == 5
    assert GenerationConfig(max_length=1000).reply_budget(100, context_length=128) == 28
    assert GenerationConfig().reply_budget(127, context_length=128) == 1


def test_reply_budget_max_length_overflow_message() -> None:
    cfg = GenerationConfig(max_length=40)
    with pytest.raises(ContextOverflowError) as info:
        cfg.reply_budget(52)
    assert str(info.value) == (
        "max_length 40 leaves no room for a reply: the prompt is already 52 tokens; "
        "raise it or use --max-new-tokens"
    )
    assert info.value.prompt_tokens == 52
    assert info.value.limit == 40
    assert isinstance(info.value, ChatforgeError) and isinstance(info.value, ValueError)
    with pytest.raises(ContextOverflowError):
        cfg.reply_budget(40)  # exactly full: still no room


def test_reply_budget_context_overflow_message() -> None:
    with pytest.raises(ContextOverflowError) as info:
        GenerationConfig().reply_budget(300, context_length=256)
    assert str(info.value) == (
        "the prompt is 300 tokens but the model's context is 256 tokens, which leaves no "
        "room for a reply; shorten the prompt or drop history"
    )
    assert (info.value.prompt_tokens, info.value.limit) == (300, 256)


def test_reply_budget_rejects_nonsense_arguments() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        GenerationConfig().reply_budget(-1)
    with pytest.raises(ValueError, match="context_length"):
        GenerationConfig().reply_budget(1, context_length=0)


def test_replace_and_to_dict() -> None:
    cfg = GenerationConfig(stop=["</s>"], seed=3)
    other = cfg.replace(temperature=0.2)
    assert other.temperature == 0.2 and cfg.temperature == 1.0
    assert other.stop == ("</s>",) and other.seed == 3
    with pytest.raises(ValueError, match="unknown generation parameter 'temp'"):
        cfg.replace(temp=1.0)
    data = cfg.to_dict()
    assert data["stop"] == ["</s>"]
    assert data["seed"] == 3
    assert set(data) == set(GenerationConfig.param_names())
    assert json.loads(json.dumps(data)) == data
    assert GenerationConfig(**data) == cfg  # round-trips


def test_for_sample_is_the_one_seed_rule_for_n_samples() -> None:
    cfg = GenerationConfig(temperature=0.7, top_k=5, seed=7)
    assert cfg.for_sample(0) is cfg  # sample 0 is the run's own seed (chat --seed S)
    assert [cfg.for_sample(j).seed for j in range(1, 4)] == [8, 9, 10]
    assert cfg.for_sample(2) == cfg.replace(seed=9)  # nothing else changes
    top = GenerationConfig(seed=2**64 - 1)
    assert top.for_sample(1).seed == 0 and top.for_sample(3).seed == 2  # wraps at 2**64
    unseeded = GenerationConfig(temperature=0.7)
    assert all(unseeded.for_sample(j) is unseeded for j in range(3))  # None stays None
    assert unseeded.for_sample(5).seed is None


def test_presets() -> None:
    assert set(PRESETS) == {"precise", "balanced", "creative"}
    precise = GenerationConfig.from_preset("precise")
    assert precise.temperature == 0.0 and precise.greedy
    balanced = GenerationConfig.from_preset("balanced")
    assert (balanced.temperature, balanced.top_p, balanced.min_p) == (0.2, 0.9, 0.2)
    assert balanced.repetition_penalty == 1.05


def test_an_explicit_temperature_zero_is_plain_greedy() -> None:
    # -t 0 means the model's most likely tokens: the preset's penalties do not apply...
    greedy = GenerationConfig.from_preset("balanced", temperature=0)
    assert greedy.greedy and greedy.repetition_penalty == 1.0
    # ...unless asked for, and other temperatures keep them.
    assert (
        GenerationConfig.from_preset(
            "balanced", temperature=0, repetition_penalty=1.2
        ).repetition_penalty
        == 1.2
    )
    assert GenerationConfig.from_preset("balanced", temperature=0.5).repetition_penalty == 1.05
    creative = GenerationConfig.from_preset("creative")
    assert (creative.temperature, creative.top_p, creative.min_p) == (1.0, 0.95, 0.05)
    assert creative.repetition_penalty == 1.05
    # None overrides are ignored; others win over the preset.
    cfg = GenerationConfig.from_preset("creative", temperature=None, top_k=40, seed=None)
    assert cfg.temperature == 1.0 and cfg.top_k == 40 and cfg.seed is None
    with pytest.raises(ValueError, match="unknown preset 'wild'; choose one of: precise"):
        GenerationConfig.from_preset("wild")
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationConfig.from_preset("balanced", top_p=2.0)


def test_set_param_parses_text() -> None:
    cfg = GenerationConfig()
    assert cfg.set_param("temperature", "0.2").temperature == 0.2
    assert cfg.set_param("top-p", "0.8").top_p == 0.8
    assert cfg.set_param("TOP_K", " 40 ").top_k == 40
    assert cfg.set_param("max-new-tokens", "12").max_new_tokens == 12
    assert cfg.set_param("seed", "7").seed == 7
    assert cfg.set_param("stop", "User:|\\n\\n").stop == ("User:", "\n\n")
    assert cfg.set_param("do-sample", "false").do_sample is False
    assert cfg.set_param("do_sample", "auto").do_sample is None
    assert cfg.temperature == 1.0  # the original is unchanged


def test_set_param_off_clears_optional_settings() -> None:
    cfg = GenerationConfig(seed=1, max_length=50, max_new_tokens=10, stop="x", top_k=5)
    assert cfg.set_param("seed", "none").seed is None
    assert cfg.set_param("max_length", "off").max_length is None
    assert cfg.set_param("max-new-tokens", "None").max_new_tokens is None
    assert cfg.set_param("stop", "off").stop == ()
    assert cfg.set_param("top_k", "off").top_k == 0


def test_set_param_errors() -> None:
    cfg = GenerationConfig()
    with pytest.raises(ValueError) as info:
        cfg.set_param("temprature", "1")
    assert "unknown generation parameter 'temprature'" in str(info.value)
    assert "temperature" in str(info.value) and "top_p" in str(info.value)
    with pytest.raises(ValueError, match="top_p must be a number"):
        cfg.set_param("top-p", "high")
    with pytest.raises(ValueError, match="top_p must be in"):
        cfg.set_param("top-p", "2")
    with pytest.raises(ValueError, match="temperature must be"):
        cfg.set_param("temperature", "nan")
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        cfg.set_param("max_new_tokens", "lots")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        cfg.set_param("max_new_tokens", "0")
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        cfg.set_param("stop", "a||b")
    with pytest.raises(ValueError, match="do_sample"):
        cfg.set_param("do_sample", "maybe")


def test_the_python_api_and_the_cli_share_defaults(tiny_llama_dir) -> None:
    from chatforge import load_model
    from chatforge.chat import ChatSession
    from chatforge.cli.options import GenerationFlags
    from chatforge.generation.config import DEFAULT_PRESET

    cli = GenerationFlags().config(default_preset=DEFAULT_PRESET)
    assert ChatSession(load_model(str(tiny_llama_dir))).config == cli == GenerationConfig.default()
    assert cli.min_p == PRESETS[DEFAULT_PRESET]["min_p"]


def test_one_rule_for_defaults_the_constructor_is_neutral_the_entry_points_use_the_preset(
    tiny_llama_dir,
) -> None:
    # Regression: GenerationConfig() started at temperature 0.7, neither OpenAI's neutral
    # default nor the balanced preset the README documents for chat/generate/the API.
    from chatforge import load_model
    from chatforge.chat import ChatSession
    from chatforge.remote import RemoteSession

    neutral = GenerationConfig()
    # Every "can be off" setting is off, and the temperature is OpenAI's 1.
    assert neutral.temperature == 1.0 and not neutral.greedy
    assert (neutral.top_k, neutral.top_p, neutral.min_p) == (0, 1.0, 0.0)
    assert (neutral.repetition_penalty, neutral.no_repeat_ngram_size) == (1.0, 0)
    assert (neutral.presence_penalty, neutral.frequency_penalty) == (0.0, 0.0)
    assert neutral.logit_bias is None and neutral.json_schema is None
    # The preset is what default() gives, and what every optional config falls back to.
    preset = GenerationConfig.default()
    assert preset == GenerationConfig(**PRESETS["balanced"])
    assert ChatSession(load_model(str(tiny_llama_dir))).config == preset
    # An endpoint gets the preset's values every endpoint takes (no extras: a strict one
    # such as OpenAI's would answer 400 to min_p); see chatforge.openai_api.
    remote = RemoteSession("http://127.0.0.1:9/v1", model="x").config
    assert remote == GenerationConfig(temperature=preset.temperature, top_p=preset.top_p)
    doc = GenerationConfig.__doc__ or ""
    assert "constructor is neutral" in doc and "default" in doc


def test_generate_batch_without_a_config_uses_the_preset(
    tiny_llama_dir, monkeypatch, tmp_path
) -> None:
    from chatforge import load_model
    from chatforge.batch import local

    seen: list[GenerationConfig] = []
    real = local.GenerationConfig.default

    def spy(**kw):
        cfg = real(**kw)
        seen.append(cfg)
        return cfg

    monkeypatch.setattr(local.GenerationConfig, "default", spy)
    lm = load_model(str(tiny_llama_dir))
    local.generate_batch(lm, ["hi"], tmp_path / "out.jsonl", progress=False)
    assert seen == [real()]
