"""``chatforge`` through its real entry points, on the tiny random models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import run


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-k", "-3"], "--top-k must be >= 0"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--temperature", "hot"], "Invalid value for '--temperature'"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'; use fp32, bf16, fp16 (a GPU) or auto"),
        (
            ["--prompt-file", "/nonexistent/prompts.txt"],
            "prompt file /nonexistent/prompts.txt does not exist",
        ),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(flags, needle, capsys, tiny_llama_dir):
    code, out, err = run(["chat", "--model", str(tiny_llama_dir), *flags], capsys, "hi\n")
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert out == ""


def test_max_length_too_small_is_a_clear_error(capsys, tiny_llama_dir):
    code, _, err = run(
        ["chat", "--model", str(tiny_llama_dir), "--max-length", "5"], capsys, "hi\n"
    )
    assert code == 2
    assert "max_length 5 leaves no room for a reply: the prompt is already" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_models_are_clear_errors(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"not a gguf at all" * 10)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x10")
    cases = [
        (str(tmp_path / "missing"), "not found: no such directory or file"),
        (str(empty), "is empty"),
        (str(corrupt), "is not a valid GGUF file"),
        (str(truncated), "could not read GGUF file"),
        ("nosuchmodel", "not found"),
    ]
    for ref, needle in cases:
        code, out, err = run(["chat", "--model", ref], capsys, "hi\n")
        assert code == 2, ref
        assert needle in err, (ref, err)
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


def test_hub_id_offline_fails_fast(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["chat", "--model", "someone/not-cached-model"], capsys, "hi\n")
    assert code == 2
    assert "not in the local Hugging Face cache" in err


def test_prompt_file_conversation_with_jsonl_transcript(capsys, tmp_path, tiny_llama_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n\n   \nHow are you?\n")
    out_file = tmp_path / "t.jsonl"
    code, out, err = run(
        [
            "chat",
            "--model",
            str(tiny_llama_dir),
            "--prompt-file",
            str(prompts),
            "-t",
            "0",
            "--max-new-tokens",
            "5",
            "--system",
            "Be brief.",
            "--output-file",
            str(out_file),
        ],
        capsys,
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["role"] for r in rows] == ["system", "user", "assistant", "user", "assistant"]
    assert rows[1]["content"] == "Hello there" and rows[3]["content"] == "How are you?"
    reply = rows[2]
    assert reply["params"]["temperature"] == 0.0
    assert reply["completion_tokens"] <= 5
    assert reply["finish_reason"] in ("stop", "length")
    assert reply["prompt_tokens"] > 0 and reply["seconds"] >= 0
    # The second prompt is the next turn of the same conversation: its prompt is longer,
    # and the first turn's KV is reused (whole blocks of it).
    assert rows[4]["prompt_tokens"] > reply["prompt_tokens"]
    assert reply["cached_tokens"] == 0 and 0 < rows[4]["cached_tokens"] <= reply["prompt_tokens"]
    assert out.count("\n") == 2


def test_independent_prompts_and_text_transcript(capsys, tmp_path, tiny_llama_dir):
    out_file = tmp_path / "t.txt"
    code, out, err = run(
        [
            "chat",
            "--model",
            str(tiny_llama_dir),
            "--prompt-file",
            "-",
            "--independent",
            "-t",
            "0",
            "--max-new-tokens",
            "4",
            "-o",
            str(out_file),
        ],
        capsys,
        "Hello there\nHello there\n",
    )
    assert code == 0, err
    a, b = out.splitlines()
    assert a == b  # same prompt, fresh conversation, greedy: same reply
    text = out_file.read_text()
    assert text.count("User: Hello there") == 2 and text.count("Assistant:") == 2


def test_transcript_appends_and_survives_a_torn_line(capsys, tmp_path, tiny_llama_dir):
    out_file = tmp_path / "t.jsonl"
    out_file.write_text('{"role": "user", "content": "earlier"}\n{"role": "assis')  # crash
    code, _, err = run(
        [
            "chat",
            "--model",
            str(tiny_llama_dir),
            "-t",
            "0",
            "--max-new-tokens",
            "3",
            "-o",
            str(out_file),
        ],
        capsys,
        "Hi\n",
    )
    assert code == 0, err
    lines = out_file.read_text().splitlines()
    assert json.loads(lines[0])["content"] == "earlier"
    assert lines[1] == '{"role": "assis'  # the torn line is left alone, not glued to
    assert [json.loads(x)["role"] for x in lines[2:]] == ["user", "assistant"]


def test_slash_commands_in_piped_input(capsys, tmp_path, tiny_llama_dir):
    saved = tmp_path / "saved.jsonl"
    code, out, err = run(
        ["chat", "--model", str(tiny_llama_dir), "-t", "0", "--max-new-tokens", "3"],
        capsys,
        f"Hello\n/set temperature 0.5\n/params\n/system Be nice.\n/history\n/save {saved}\n"
        "/reset\n/history\n/quit\nnever sent\n",
    )
    assert code == 0, err
    assert "temperature = 0.5" in err
    rows = [json.loads(x) for x in saved.read_text().splitlines()]
    assert [r["role"] for r in rows] == ["system", "user", "assistant"]
    assert rows[0]["content"] == "Be nice."
    assert len(out.splitlines()) == 1  # one reply; nothing after /quit


def test_bad_set_value_in_piped_input_is_an_error(capsys, tiny_llama_dir):
    code, _, err = run(["chat", "--model", str(tiny_llama_dir)], capsys, "/set top_p 7\n")
    assert code == 2
    assert "top-p must be in (0, 1]" in err


def test_sep_format_model_chats(capsys, tmp_path, tiny_gpt2_dir):
    """A GPT-2 directory recorded as sep format chats with no format flag."""
    import shutil

    from chatforge.conversation import ensure_sep_token
    from chatforge.models.meta import ModelMeta

    d = tmp_path / "sep-model"
    shutil.copytree(tiny_gpt2_dir, d)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    ensure_sep_token(tok, model)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    ModelMeta(prompt_format="sep").write(d)
    from chatforge import load_model

    assert load_model(str(d)).info.prompt_format == "sep"
    code, out, err = run(
        ["chat", "--model", str(d), "-t", "0", "--max-new-tokens", "4"], capsys, "Hello\n"
    )
    assert code == 0, err


def test_models_list(capsys, tiny_llama_dir):
    code, out, _ = run(["models", "list"], capsys)
    assert code == 0
    assert "smollm2" in out


@pytest.mark.slow
def test_console_script_and_module_entry_points(tiny_llama_dir):
    exe = Path(sys.executable).parent / "chatforge"
    for cmd in ([str(exe)], [sys.executable, "-m", "chatforge"]):
        p = subprocess.run(
            [*cmd, "chat", "--model", str(tiny_llama_dir), "--max-new-tokens", "3", "-t", "0"],
            input="Hello\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() != "" or p.stdout == "\n"
        bad = subprocess.run(
            [*cmd, "chat", "--top-p", "1.5"], capture_output=True, text=True, timeout=120
        )
        assert bad.returncode == 2
        assert (
            bad.stderr.strip().splitlines() == ["error: --top-p must be in (0, 1] (got 1.5)"]
            or "--top-p must be in (0, 1]" in bad.stderr
        )


def test_a_bad_chat_flag_is_reported_before_torch_is_imported():
    """The flags are checked before anything imports torch (3 s): the error comes at once."""
    code = (
        "import sys\n"
        "from chatforge.cli.app import main\n"
        "sys.argv = ['chatforge', 'chat', '--top-p', '1.5']\n"
        "try:\n"
        "    rc = main()\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["2", "False"], (p.stdout, p.stderr)
    assert "--top-p must be in (0, 1]" in p.stderr


def test_logit_bias_and_penalty_flags(capsys, tmp_path, tiny_llama_dir):
    out_file = tmp_path / "t.jsonl"
    argv = ["chat", "--model", str(tiny_llama_dir), "--prompt-file", "-", "-t", "0"]
    code, _, err = run(
        [
            *argv,
            "--max-new-tokens",
            "3",
            "--logit-bias",
            "9:100",
            "--presence-penalty",
            "0.5",
            "--output-file",
            str(out_file),
        ],
        capsys,
        "Hello there\n",
    )
    assert code == 0, err
    reply = [json.loads(line) for line in out_file.read_text().splitlines()][-1]
    assert reply["params"]["logit_bias"] == {"9": 100.0}
    assert reply["params"]["presence_penalty"] == 0.5
    code, _, err = run([*argv, "--logit-bias", "nine"], capsys, "hi\n")
    assert code == 2 and "--logit-bias takes ID:BIAS" in err and len(err.splitlines()) == 1
    code, _, err = run([*argv, "--frequency-penalty", "3"], capsys, "hi\n")
    assert code == 2 and "--frequency-penalty must be in [-2, 2]" in err
