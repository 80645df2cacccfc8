"""``--help`` shows every default, and no bare ``<bool>`` metavars."""

from __future__ import annotations

import re

import pytest

from chatforge.cli.app import main

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
