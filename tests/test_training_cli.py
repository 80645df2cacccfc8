"""``chatforge train / eval / data / tokenizer`` through the real entry point."""

from __future__ import annotations

import json

import pytest

from chatforge.cli.app import main
from training_helpers import write_convmodel


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--data", "/nonexistent/d.jsonl"], "data file /nonexistent/d.jsonl does not exist"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--train-on", "users"], "--train-on must be one of assistant, all, last"),
        (["--valid-split", "1.5"], "--valid-split must be in (0, 1)"),
        (["--format", "xml"], "--format must be one of chat_template, sep, eos"),
        (["--merge"], "merge only applies to LoRA training; add --lora"),
        (["--max-steps", "ten"], "Invalid value for '--max-steps'"),
        (["--init", "gpt2"], "--model: give either a model to fine-tune (--model) or --init gpt2"),
    ],
)
def test_train_bad_input_one_line_exit_2(flags, needle, capsys, tmp_path, tiny_gpt2_dir):
    data = write_convmodel(tmp_path / "d.jsonl", n=4)
    argv = ["train", "--model", str(tiny_gpt2_dir), "--output", str(tmp_path / "o")]
    if "--data" not in flags:
        argv += ["--data", str(data)]
    code, out, err = run(argv + flags, capsys)
    assert code == 2, err
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_train_scratch_needs_tokenizer_and_refuses_nonempty_output(capsys, tmp_path):
    data = write_convmodel(tmp_path / "d.jsonl", n=4)
    code, _, err = run(["train", "--init", "gpt2", "--data", str(data), "-o", "x"], capsys)
    assert code == 2 and "--tokenizer: a new model needs --tokenizer DIR" in err
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["train", "--init", "gpt2", "--tokenizer", str(tmp_path), "--data", str(data)]
    code, _, err = run([*argv, "-o", str(out)], capsys)
    assert code == 2 and "is not empty; use --resume" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_tokenizer_train_then_scratch_model_then_eval_json(capsys, tmp_path):
    data = write_convmodel(tmp_path / "d.jsonl", n=24)
    tok = tmp_path / "tok"
    code, _, err = run(
        ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--output", str(tok)],
        capsys,
    )
    assert code == 0, err
    assert (tok / "tokenizer.json").exists()
    argv = ["tokenizer", "train", "--data", str(data), "--vocab-size", "10"]
    code, _, err = run([*argv, "-o", str(tmp_path / "t2")], capsys)
    assert code == 2 and "--vocab-size must be >= 258" in err
    model = tmp_path / "m"
    argv = ["train", "--init", "gpt2", "--tokenizer", str(tok), "--data", str(data)]
    argv += ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--context", "64"]
    argv += ["--max-steps", "2", "--batch-size", "2", "--precision", "fp32", "-q", "-o", str(model)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    meta = json.loads((model / "chatforge.json").read_text())
    assert meta["prompt_format"] == "sep"
    argv = ["eval", "--model", str(model), "--compare", str(model), "--data", str(data)]
    argv += ["--limit", "4", "--replies", "2", "--max-new-tokens", "4", "--json"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    res = json.loads(out)
    assert [m["model"] for m in res["models"]] == [str(model), str(model)]
    first = res["models"][0]
    for key in ("perplexity", "distinct_1", "distinct_2", "repeated_ngram_rate"):
        assert key in first
    assert first["perplexity"] > 1 and first["replies"] == 2
    assert first["mean_reply_tokens"] <= 4
    assert res["models"][0]["perplexity"] == res["models"][1]["perplexity"]


def test_data_inspect_highlights_and_counts(capsys, tmp_path, tiny_llama_dir):
    data = write_convmodel(tmp_path / "d.jsonl", n=5, bad_lines=1)
    code, out, err = run(["data", "inspect", str(data), "--model", str(tiny_llama_dir)], capsys)
    assert code == 0, err
    assert "example 1" in out and "statistics" in out
    assert "malformed lines skipped" in out
    assert "d.jsonl:6:invalidJSON" in "".join(out.split())  # however rich wraps the path
    code, _, err = run(["data", "inspect", str(tmp_path / "none.jsonl"), "--model", "x"], capsys)
    assert code == 2 and "does not exist" in err


def test_data_inspect_piped_keeps_every_character(capsys, tmp_path, tiny_llama_dir):
    # A learned span starting with a lowercase letter used to be eaten as rich markup.
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Hi [there]"},
                {"role": "assistant", "content": "bold reply"},
            ]
        }
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(["data", "inspect", str(data), "--model", str(tiny_llama_dir)], capsys)
    assert code == 0, err
    assert "[[bold reply<|im_end|>]]" in out and "Hi [there]" in out


def test_eval_bad_input(capsys, tmp_path, tiny_gpt2_dir):
    code, _, err = run(
        ["eval", "--model", str(tiny_gpt2_dir), "--data", str(tmp_path / "no.jsonl")], capsys
    )
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
