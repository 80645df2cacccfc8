"""Training under faults: corrupt checkpoints, binary data, a resume with other flags,
and failed runs that must leave the filesystem as they found it."""

from __future__ import annotations

import json
import os

import pytest

from chatforge.errors import ChatforgeError
from chatforge.training import checkpoint as ckpt
from chatforge.training.trainer import train
from cli_helpers import run
from training_helpers import tiny_config, write_convmodel

# The start of an ELF executable: magic, then bytes that are not UTF-8.
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4


def _names(out):
    return [p.name for p in ckpt.step_checkpoints(out)]


def _garble(path):
    """Truncate a weights file to half its size (a torn write, a full disk)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _three_checkpoints(tmp_path, model_dir):
    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "out"
    cfg = tiny_config(data, out, model_dir, max_steps=3, save_every=1, keep_checkpoints=3)
    train(cfg)
    assert _names(out) == ["step-00000003", "step-00000002", "step-00000001"]
    return data, out


def _one_line_error(code, err, needle):
    assert code == 2, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def _train_argv(model_dir, data, out, *more):
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
        "--max-steps", "3", "--batch-size", "2", "--context", "64", "--save-every", "1",
        "--precision", "fp32", "--lr", "1e-3", "--quiet", *more,
    ]  # fmt: skip


# -- checkpoints ---------------------------------------------------------------


def test_prune_never_deletes_the_newest_intact_checkpoint(tmp_path, tiny_gpt2_dir):
    _, out = _three_checkpoints(tmp_path, tiny_gpt2_dir)
    _garble(out / "checkpoints" / "step-00000003" / "weights.safetensors")
    said = []
    removed = ckpt.prune(out, 1, said.append)
    # step 2 is the newest good one: kept; the corrupt step 3 is left (not counted); 1 goes
    assert _names(out) == ["step-00000003", "step-00000002"]
    assert [p.name for p in removed] == ["step-00000001"]
    assert ckpt.verify(out / "checkpoints" / "step-00000002") is None
    assert any("step-00000003 is not usable" in s for s in said)


def test_prune_rehashes_a_checkpoint_garbled_after_it_was_verified(tmp_path, tiny_gpt2_dir):
    _, out = _three_checkpoints(tmp_path, tiny_gpt2_dir)
    ckpt.prune(out, 3)  # all three verified (and remembered)
    w = out / "checkpoints" / "step-00000003" / "weights.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size; a new mtime
    w.write_bytes(bytes(raw))
    os.utime(w, ns=(1, 1))
    ckpt.prune(out, 1)
    assert _names(out) == ["step-00000003", "step-00000002"]


def test_resume_skips_a_corrupt_newest_and_keeps_the_good_ones(tmp_path, tiny_gpt2_dir, capsys):
    data, out = _three_checkpoints(tmp_path, tiny_gpt2_dir)
    _garble(out / "checkpoints" / "step-00000003" / "weights.safetensors")
    capsys.readouterr()
    res = train(
        tiny_config(data, out, tiny_gpt2_dir, max_steps=5, save_every=1, keep_checkpoints=2,
                    resume=True)
    )  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert "skipping checkpoint step-00000003: weights.safetensors does not match" in err
    assert res.resumed_from == 2 and res.steps == 5
    assert _names(out) == ["step-00000005", "step-00000004"]
    assert all(ckpt.verify(p) is None for p in ckpt.step_checkpoints(out))


def test_resume_without_a_usable_checkpoint_is_an_error(tmp_path, tiny_gpt2_dir, capsys):
    data, out = _three_checkpoints(tmp_path, tiny_gpt2_dir)
    cks = out / "checkpoints"
    _garble(cks / "step-00000003" / "weights.safetensors")
    (cks / "step-00000002" / "state.json").write_text("{}")
    (cks / "step-00000001" / "COMPLETE").unlink()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    config_before = (out / "train_config.json").read_text()
    capsys.readouterr()
    code, _, err = run(_train_argv(tiny_gpt2_dir, data, out, "--resume"), capsys)
    _one_line_error(code, err, f"--resume: no usable checkpoint in {cks}")
    assert "step-00000003: weights.safetensors does not match" in err
    assert "step-00000002: state.json does not match" in err
    assert "step-00000001: no completion marker" in err
    # nothing was deleted, nothing was restarted at step 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "train_config.json").read_text() == config_before


def test_resume_with_no_checkpoint_at_all_leaves_no_folder(tmp_path, tiny_gpt2_dir, capsys):
    data = write_convmodel(tmp_path / "d.jsonl", n=8)
    out = tmp_path / "new" / "out"
    code, _, err = run(_train_argv(tiny_gpt2_dir, data, out, "--resume"), capsys)
    _one_line_error(code, err, "no usable checkpoint in")
    assert "none was written (start afresh with no --resume)" in err
    assert not (tmp_path / "new").exists()


def test_resume_with_other_architecture_names_the_flag(tmp_path, tiny_gpt2_dir, capsys):
    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "out"
    new = ["--init", "gpt2", "--tokenizer", str(tiny_gpt2_dir), "--n-embd", "32", "--n-head", "2"]
    argv = _train_argv(tiny_gpt2_dir, data, out)
    argv = argv[:1] + argv[3:]  # no --model: a new model
    code, _, err = run([*argv, *new, "--n-layer", "1", "--max-steps", "2"], capsys)
    assert code == 0, err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    for flags, needle in [
        (["--n-layer", "2"], "--n-layer is 2 but checkpoint step-00000002 was trained with 1"),
        (["--n-layer", "1", "--context", "32"], "--context is 32 but checkpoint"),
    ]:
        code, _, err = run([*argv, *new, *flags, "--resume"], capsys)
        _one_line_error(code, err, needle)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_load_trainable_names_a_shape_mismatch():
    import torch

    model = torch.nn.Linear(4, 3)
    state = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"weight has shape \(3, 5\), the model's is \(3, 4\)"):
        ckpt.load_trainable(model, state)


# -- data ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["d.jsonl", "d.txt", "d.bin"])
def test_binary_data_is_rejected_with_file_and_line(name, tmp_path, tiny_gpt2_dir, capsys):
    data = tmp_path / name
    data.write_bytes(b"hello\n" + ELF)
    out = tmp_path / "out"
    code, _, err = run(_train_argv(tiny_gpt2_dir, data, out), capsys)
    _one_line_error(code, err, f"{data}:2: NUL byte at column 8")
    assert "not UTF-8 text" in err
    assert not out.exists()  # the run made the folder and wrote nothing: it is gone


def test_binary_file_in_a_text_folder_names_that_file(tmp_path, tiny_gpt2_dir, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("a fine text\n" * 20)
    (folder / "b.txt").write_bytes(b"ok\nok\nx\x00y\n")
    out = tmp_path / "out"
    out.mkdir()  # existed before: a failed run must not remove it
    code, _, err = run(_train_argv(tiny_gpt2_dir, folder, out), capsys)
    _one_line_error(code, err, f"{folder / 'b.txt'}:3: NUL byte at column 2")
    assert out.is_dir() and not any(out.iterdir())


def test_valid_utf8_still_trains(tmp_path, tiny_gpt2_dir, capsys):
    data = tmp_path / "d.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(8):
            f.write(json.dumps([f"héllo wörld {i} ☕", "grüß dich 日本"]) + "\n")
    code, _, err = run(_train_argv(tiny_gpt2_dir, data, tmp_path / "out"), capsys)
    assert code == 0, err


def test_failed_run_keeps_a_folder_with_foreign_content(tmp_path, tiny_gpt2_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(ELF)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(_train_argv(tiny_gpt2_dir, data, out, "--overwrite"), capsys)
    _one_line_error(code, err, f"{data}:1: NUL byte")
    assert (out / "notes.txt").read_text() == "mine"


def test_library_error_for_binary_data(tmp_path, tiny_gpt2_dir):
    data = tmp_path / "d.jsonl"
    data.write_bytes(ELF)
    with pytest.raises(ChatforgeError, match=r"d\.jsonl:1: NUL byte"):
        train(tiny_config(data, tmp_path / "out", tiny_gpt2_dir))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_latin1_line_in_jsonl_is_rejected_even_when_skipping(
    on_error, tmp_path, tiny_gpt2_dir, capsys
):
    data = write_convmodel(tmp_path / "d.jsonl", n=8)
    with open(data, "ab") as f:
        f.write(b'["caf\xe9 au lait", "oui"]\n')
    out = tmp_path / "out"
    code, _, err = run(_train_argv(tiny_gpt2_dir, data, out, "--on-error", on_error), capsys)
    _one_line_error(code, err, f"{data}:9: byte 0xe9 at column 6: this is not UTF-8 text")
    assert not out.exists()


def test_failed_model_load_leaves_no_empty_output_folder(tmp_path, tiny_gpt2_dir, capsys):
    data = write_convmodel(tmp_path / "d.jsonl", n=8)
    out = tmp_path / "a" / "b" / "out"
    argv = _train_argv(tiny_gpt2_dir, data, out, "--context", "999999")
    code, _, err = run(argv, capsys)
    _one_line_error(code, err, "context must be <= the model's context length")
    assert not (tmp_path / "a").exists()  # every folder the run made is gone again
