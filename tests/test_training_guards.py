"""Training that does not fail silently or waste the user's time (issue 26, items 3-6):
a loss gone NaN stops the run, an honest memory estimate, Ctrl-C answered at once,
resume checked against the data, prepared data cached, a killed run's folder reusable,
a readable default --log-every, warnings above the progress bar, free-core threads."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest

from chatforge.errors import ChatforgeError
from chatforge.training import checkpoint as ckpt
from chatforge.training.trainer import train
from cli_helpers import run
from conftest import TINY_TOKENIZER
from training_helpers import tiny_config, write_convmodel

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _argv(model_dir, data, out, *more):
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
        "--batch-size", "2", "--context", "64", "--precision", "fp32", "--quiet", *more,
    ]  # fmt: skip


def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))


# -- item 4: no silent failure ------------------------------------------------------


def test_nan_loss_stops_at_that_step_keeps_the_last_checkpoint_exit_1(
    tmp_path, tiny_gpt2_dir, capsys
):
    from safetensors.torch import load_file

    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "out"
    argv = _argv(tiny_gpt2_dir, data, out, "--max-steps", "8", "--save-every", "1", "--lr", "1e6")
    code, _, err = run(argv, capsys)
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    msg = lines[0]
    assert "became nan" in msg or "became inf" in msg, msg
    assert "--lr 1e+06 is likely too high; try --lr" in msg, msg
    assert "done:" not in err and not (out / "chatforge.json").exists()  # no model written
    step = int(msg.split(" at step ")[1].split()[0])
    kept = ckpt.step_checkpoints(out)
    assert kept and kept[0].name == ckpt.step_name(step - 1), (msg, kept)
    assert ckpt.verify(kept[0]) is None and f"kept in {kept[0]}" in msg
    weights = load_file(str(kept[0] / "weights.safetensors"))
    assert all(bool(w.isfinite().all()) for w in weights.values())  # no NaN was saved


def test_memory_estimate_counts_the_attention_mask_and_scores(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    from chatforge.training import memory

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    est = memory.estimate(model, 8, 100_000, False)
    # The packed batch's (B, 1, T, T) fp32 mask alone is 8 * 1e10 * 4 bytes.
    assert est.total > 8 * 100_000**2 * 4
    small = memory.estimate(model, 1, 64, False)
    assert small.total < 1 * memory.GB


def test_a_run_that_would_not_fit_is_refused_with_the_flags(tmp_path, monkeypatch, capsys):
    from chatforge.training import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: int(1.0 * memory.GB))
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat and looked at the dog. " * 3000)
    out = tmp_path / "out"
    argv = [
        "train", "--init", "gpt2", "--tokenizer", str(TINY_TOKENIZER), "--data", str(corpus),
        "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--context", "4096",
        "--batch-size", "8", "--max-steps", "1", "--quiet", "--output", str(out),
    ]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert "training needs about" in err and "1.0 GB is available" in err, err
    assert "--batch-size" in err and "--context" in err and "--force" in err
    assert not out.exists()  # nothing was left behind


# -- Ctrl-C ----------------------------------------------------------------------------


def _sigint_default() -> None:
    # A test runner started in the background without job control (`cmd &` in a script)
    # hands its children SIGINT ignored, and Python then installs no Ctrl-C handler at
    # all: the child would train on forever. A terminal's Ctrl-C is what we simulate.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(argv, cwd):
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "chatforge", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_default,
    )


def _interrupt_when(proc, ready, answer: str, timeout=120.0) -> tuple[float, str]:
    """SIGINT ``proc`` once ``ready()``; (seconds until its stderr says ``answer``, stderr)."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t1 = time.monotonic()
    said = []
    for line in proc.stderr:  # line by line, as it comes
        said.append(line)
        if answer in line:
            break
    took = time.monotonic() - t1
    said.append(proc.stderr.read())
    proc.wait(timeout=60)
    return took, "".join(said)


@pytest.mark.slow
def test_ctrl_c_while_preparing_data_answers_at_once(tmp_path, tiny_llama_dir):
    data = write_convmodel(tmp_path / "d.jsonl", n=20000)  # several seconds of chat templates
    out = tmp_path / "out"
    argv = _argv(tiny_llama_dir, data, out, "--max-steps", "1")
    argv.remove("--quiet")  # the "preparing data" line is what we wait for
    proc = _spawn(argv, tmp_path)

    def preparing():
        return "preparing data" in proc.stderr.readline()

    took, err = _interrupt_when(proc, preparing, "interrupted before training started")
    assert took < 2.0, (took, err)
    assert proc.returncode == 130, err
    # Nothing is left that would stop the same command (no --overwrite) from running.
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"train_config.json"}


@pytest.mark.slow
def test_ctrl_c_while_training_answers_at_once_and_leaves_a_checkpoint(tmp_path, tiny_gpt2_dir):
    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "out"
    argv = _argv(tiny_gpt2_dir, data, out, "--max-steps", "100000", "--log-every", "1")
    proc = _spawn(argv, tmp_path)
    took, err = _interrupt_when(proc, lambda: (out / "metrics.jsonl").exists(), "interrupted at")
    assert took < 2.0, (took, err)
    assert proc.returncode == 130, err
    assert "writing a checkpoint" in err and "continue with --resume" in err
    found, _ = ckpt.candidates(out)
    assert found is not None


# -- item 5: resume checked both ways ---------------------------------------------------


def test_resume_with_other_data_is_refused_same_data_elsewhere_accepted(tmp_path, tiny_gpt2_dir):
    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "out"
    train(tiny_config(data, out, tiny_gpt2_dir, max_steps=2, save_every=1))
    other = write_convmodel(tmp_path / "other.jsonl", n=10)
    with pytest.raises(ChatforgeError) as e:
        train(tiny_config(other, out, tiny_gpt2_dir, max_steps=3, resume=True))
    msg = str(e.value)
    assert f"cannot resume {out}: it was trained on {data}" in msg
    assert f"this run gives {other}" in msg and "pass the same --data" in msg
    # The same bytes under another name and folder are the same data.
    moved = tmp_path / "elsewhere" / "copy.jsonl"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    res = train(tiny_config(moved, out, tiny_gpt2_dir, max_steps=3, resume=True))
    assert res.resumed_from == 2 and res.steps == 3


def test_resume_accepts_the_same_tokenizer_from_another_directory(tmp_path, monkeypatch):
    from chatforge.training.config import TrainConfig

    shutil.copytree(TINY_TOKENIZER, tmp_path / "tok")
    data = write_convmodel(tmp_path / "d.jsonl", n=12)

    def cfg(tokenizer, steps, **kw):
        return TrainConfig(
            data=[str(data)], output=str(tmp_path / "out"), init="gpt2", tokenizer=tokenizer,
            n_layer=1, n_embd=32, n_head=2, context=64, batch_size=2, max_steps=steps,
            save_every=1, eval_every=0, progress=False, precision="fp32", lr=1e-3, **kw,
        )  # fmt: skip

    monkeypatch.chdir(tmp_path)
    train(cfg("tok", 2))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    res = train(cfg("../tok", 3, resume=True))
    assert res.resumed_from == 2 and res.steps == 3


def test_resume_with_a_new_lr_uses_it(tmp_path, tiny_gpt2_dir):
    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "out"
    kw = dict(warmup=0, min_lr_ratio=1.0)  # a flat schedule: the lr is the peak
    train(tiny_config(data, out, tiny_gpt2_dir, max_steps=2, save_every=1, lr=1e-2, **kw))
    rows = []
    res = train(
        tiny_config(data, out, tiny_gpt2_dir, max_steps=3, resume=True, lr=1e-4, **kw),
        on_step=lambda s, r: rows.append(r),
    )
    assert res.resumed_from == 2 and math.isclose(rows[-1]["lr"], 1e-4)


# -- item 6: the first minutes ---------------------------------------------------------


def test_prepared_data_is_cached_by_content(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    import chatforge.training.trainer as trainer_mod

    _own_cache(monkeypatch, tmp_path)
    calls = []
    real = trainer_mod.build_examples

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "build_examples", counting)
    data = write_convmodel(tmp_path / "d.jsonl", n=16)
    first = train(tiny_config(data, tmp_path / "a", tiny_llama_dir, progress=True))
    err = capsys.readouterr().err
    assert calls and "preparing data: 16 conversations" in err  # progress while preparing
    n = len(calls)
    second = train(tiny_config(data, tmp_path / "b", tiny_llama_dir, progress=True))
    err = " ".join(capsys.readouterr().err.split())
    assert len(calls) == n, "the second run prepared the data again"
    assert "(prepared data from the cache)" in err and "preparing data" not in err
    losses = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").open()]
    again = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").open()]
    assert losses == again and first.tokens == second.tokens  # the same rows
    # Another context (or data, tokenizer, ...) is another entry.
    train(tiny_config(data, tmp_path / "c", tiny_llama_dir, context=48))
    assert len(calls) > n


def test_a_killed_runs_folder_is_reused_but_not_a_finished_one(tmp_path, tiny_gpt2_dir, capsys):
    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "out"
    # What a run killed before its first checkpoint leaves behind.
    (out / "checkpoints" / ".tmp-step-00000002").mkdir(parents=True)
    (out / "train_config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    code, _, err = run(_argv(tiny_gpt2_dir, data, out, "--max-steps", "2"), capsys)
    assert code == 0, err
    assert "reusing" in err and (out / "chatforge.json").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # the old run's rows are gone
    # A finished model still needs --overwrite (or --resume).
    code, _, err = run(_argv(tiny_gpt2_dir, data, out, "--max-steps", "2"), capsys)
    assert code == 2 and "holds a trained model; use --overwrite" in err, err
    # An unfinished run with a checkpoint is not thrown away either.
    shutil.rmtree(out)
    train(tiny_config(data, out, tiny_gpt2_dir, max_steps=2, save_every=1))
    (out / "chatforge.json").unlink()
    for p in out.iterdir():
        if p.name not in ("checkpoints", "metrics.jsonl", "train_config.json", "loss.png"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    code, _, err = run(_argv(tiny_gpt2_dir, data, out, "--max-steps", "2"), capsys)
    assert code == 2 and "holds an unfinished run (checkpoint step-00000002" in err, err


def test_default_log_every_draws_every_step_of_a_short_run(tmp_path, tiny_gpt2_dir):
    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "out"
    train(tiny_config(data, out, tiny_gpt2_dir, max_steps=20, log_every=None))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 20
    from chatforge.training.config import TrainConfig

    cfg = TrainConfig(data=["x"], output="o", model="m")
    assert cfg.log_interval(20) == 1 and cfg.log_interval(1000) == 10
    assert cfg.log_interval(200) == 4 and cfg.log_interval(None) == 10


def test_library_log_records_print_above_the_progress_bar(capsys):
    from rich.console import Console

    from chatforge.training.progress import TrainProgress

    lib = logging.getLogger("somelib.fake")
    handler = logging.StreamHandler(sys.stderr)  # made before the bar, as libraries do
    lib.addHandler(handler)
    lib.propagate = False
    try:
        buf = StringIO()
        console = Console(file=buf, force_terminal=True, width=100)
        prog = TrainProgress(console)
        prog.start(10, None, 0)
        prog.update(1, 2.5, 100.0, 1.0)
        lib.warning("a library warning")
        prog.stop()
        assert handler.stream is sys.stderr  # put back
    finally:
        lib.removeHandler(handler)
    assert "a library warning" in buf.getvalue()  # through the console, above the bar
    assert "a library warning" not in capsys.readouterr().err


# -- item 3: the thread policy --------------------------------------------------------


def test_training_follows_the_free_core_thread_policy(tmp_path, tiny_gpt2_dir, monkeypatch):
    import torch

    import chatforge.training.trainer as trainer_mod
    from chatforge.threads import CpuSample, ThreadPolicy

    ticks = {"t": 0.0}

    def busy_other_core():  # another process keeps one of two cores fully busy
        ticks["t"] += 100.0
        t = ticks["t"]
        return CpuSample(busy=t, total=t, ours=t / 2)

    made = []

    def policy(threads=None):
        p = ThreadPolicy(threads=threads, sample=busy_other_core, cores=2, limit=2, interval=1e-9)
        made.append(p)
        return p

    monkeypatch.setattr(trainer_mod, "ThreadPolicy", policy)
    seen = []
    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    before = torch.get_num_threads()
    try:
        train(
            tiny_config(data, tmp_path / "out", tiny_gpt2_dir, max_steps=3),
            on_step=lambda s, r: seen.append(torch.get_num_threads()),
        )
    finally:
        torch.set_num_threads(before)
    assert made and made[0].auto and seen[-1] == 1 and math.isclose(made[0].others, 1.0)


def test_ctrl_c_is_noticed_while_a_long_torch_operation_runs():
    import threading

    import torch

    from chatforge.training.interrupt import InterruptNotice

    seen: list[float] = []
    a = torch.ones(2500, 2500)
    # A shell's background job starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give this test the one an interactive run has.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with InterruptNotice(lambda: seen.append(time.monotonic())):
            sent = time.monotonic() + 0.05
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            with pytest.raises(KeyboardInterrupt):  # raised once the operation returns
                for _ in range(20):
                    a @ a  # one C++ call (~0.2 s): Python's handler waits for it to return
            caught = time.monotonic()
    finally:
        signal.signal(signal.SIGINT, old)
    assert seen, "the interrupt was not noticed"
    assert seen[0] - sent < 0.5 and seen[0] < caught - 0.1, (seen[0] - sent, caught - sent)
