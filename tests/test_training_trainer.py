"""The training loop on tiny models: resume equals an uninterrupted run, checkpoints that
survive damage, the output directory is a model, LoRA with and without merging."""

from __future__ import annotations

import json

import pytest

from chatforge import ChatSession, GenerationConfig, load_model
from chatforge.errors import ChatforgeError
from chatforge.training import checkpoint as ckpt
from chatforge.training.trainer import TrainingInterrupted, train
from training_helpers import tiny_config, write_convmodel


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_after_interrupt_gives_identical_losses(tmp_path, tiny_gpt2_dir, capsys):
    data = write_convmodel(tmp_path / "d.jsonl", n=24)
    # dropout on, so the restored RNG state matters as much as the data position
    kw = dict(max_steps=6, save_every=2, seed=3)
    ref = tmp_path / "ref"
    train(tiny_config(data, ref, tiny_gpt2_dir, **kw))

    run = tmp_path / "run"

    def ctrl_c(step, row):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="interrupted at step 5; checkpoint saved"):
        train(tiny_config(data, run, tiny_gpt2_dir, **kw), on_step=ctrl_c)
    assert (run / "checkpoints" / "step-00000005" / "COMPLETE").exists()
    # Continue from the step-4 checkpoint (as after a SIGKILL), not the Ctrl-C one.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000005")
    capsys.readouterr()
    result = train(tiny_config(data, run, tiny_gpt2_dir, resume=True, **kw))
    err = capsys.readouterr().err
    assert "resuming from checkpoints/step-00000004 (step 4" in err
    assert result.resumed_from == 4 and result.steps == 6
    want, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


def test_partial_and_corrupt_checkpoints_are_skipped(tmp_path, tiny_gpt2_dir, capsys):
    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "out"
    train(tiny_config(data, out, tiny_gpt2_dir, max_steps=4, save_every=1, keep_checkpoints=3))
    cks = out / "checkpoints"
    assert [p.name for p in ckpt.step_checkpoints(out)] == [
        "step-00000004",
        "step-00000003",
        "step-00000002",
    ]
    # newest: corrupt a byte; next: a partial write without its marker
    w = cks / "step-00000004" / "weights.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0xFF
    w.write_bytes(bytes(raw))
    (cks / "step-00000003" / "COMPLETE").unlink()
    capsys.readouterr()
    res = train(tiny_config(data, out, tiny_gpt2_dir, max_steps=5, resume=True))
    err = " ".join(capsys.readouterr().err.split())
    assert "skipping checkpoint step-00000004: weights.safetensors does not match" in err
    assert "skipping checkpoint step-00000003: no completion marker" in err
    assert "resuming from checkpoints/step-00000002 (step 2" in err
    assert res.resumed_from == 2 and res.steps == 5


def test_output_dir_is_a_model_that_chats(tmp_path, tiny_llama_dir):
    data = write_convmodel(tmp_path / "d.jsonl", n=16)
    out = tmp_path / "out"
    res = train(tiny_config(data, out, tiny_llama_dir, valid_split=0.25, eval_every=2))
    assert res.val_losses and res.best_val_loss is not None
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chatforge.json"} <= files
    assert {"metrics.jsonl", "loss.png"} <= files
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and any("tokens_per_s" in r for r in rows)
    lm = load_model(str(out))
    assert lm.info.prompt_format == "chat_template"
    reply = ChatSession(lm, GenerationConfig(temperature=0, max_new_tokens=5)).send("hi")
    assert reply.text is not None
    # A second run into the same directory is refused: nothing is overwritten.
    with pytest.raises(ChatforgeError, match="holds a trained model; use --overwrite"):
        train(tiny_config(data, out, tiny_llama_dir))


def test_lora_merge_and_adapter_outputs_load(tmp_path, tiny_llama_dir):
    import torch

    data = write_convmodel(tmp_path / "d.jsonl", n=12)
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    kw = dict(lora=True, lora_r=4, max_steps=3, lr=1e-2)
    train(tiny_config(data, merged, tiny_llama_dir, merge=True, **kw))
    train(tiny_config(data, adapter, tiny_llama_dir, **kw))
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "model.safetensors").exists()
    meta = json.loads((adapter / "chatforge.json").read_text())
    assert meta["extra"]["base_model"] == str(tiny_llama_dir.resolve())
    a, b, base = load_model(str(merged)), load_model(str(adapter)), load_model(str(tiny_llama_dir))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        la, lb, l0 = (m.model(ids).logits for m in (a, b, base))
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-4)  # same weights, two layouts
    assert not torch.allclose(la, l0)  # and training changed them
    assert b.info.prompt_format == "chat_template"


def test_another_libraries_mixed_precision_does_not_leak_into_an_fp32_run(tmp_path, tiny_gpt2_dir):
    """accelerate keeps one state per process: after TRL's trainers (bf16 by default) made an
    Accelerator with bf16, ours wrapped the model in bf16 autocast and an fp32 run trained in
    bf16. The run's precision is ours: the same losses as in a fresh process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    data = write_convmodel(tmp_path / "d.jsonl", n=24)

    def losses(out):
        result = train(tiny_config(data, tmp_path / out, tiny_gpt2_dir, max_steps=3))
        assert "forward" not in vars(result.model)  # no autocast wrapper left on it
        rows = (result.output / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["loss"] for r in rows]

    AcceleratorState._reset_state()
    want = losses("fresh")
    AcceleratorState._reset_state()
    Accelerator(cpu=True, mixed_precision="bf16")
    try:
        assert losses("after-bf16") == want
    finally:
        AcceleratorState._reset_state()
