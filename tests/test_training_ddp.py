"""Two CPU processes (gloo) through ``accelerate launch``: ranks stay in sync, result loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training_helpers import write_convmodel

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

SCRIPT = """
import json, sys
from accelerate import PartialState
from chatforge.training.config import TrainConfig
from chatforge.training.trainer import train

data, out, model = sys.argv[1:4]
cfg = TrainConfig(data=[data], output=out, model=model, max_steps=3, batch_size=2, context=64,
                  log_every=1, save_every=2, precision="fp32", progress=False, lr=1e-2)
res = train(cfg)
state = PartialState()
total = sum(float(p.detach().double().abs().sum()) for p in res.model.parameters())
with open(f"{out}-rank{state.process_index}.json", "w") as f:
    json.dump({"world": state.num_processes, "backend": state.backend, "sum": total,
               "steps": res.steps}, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_two_process_training_stays_in_sync_and_loads(tmp_path, tiny_gpt2_dir):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("accelerate launcher not installed")
    data = write_convmodel(tmp_path / "d.jsonl", n=24)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # `--cpu` makes accelerate expect mpirun for several processes; its torchrun launcher
    # (--multi_gpu) starts 2 processes, and with no GPU the Accelerator picks gloo on CPU.
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port())]
    cmd += [str(script), str(data), str(out), str(tiny_gpt2_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    assert ranks[0]["sum"] == pytest.approx(ranks[1]["sum"], rel=1e-9)  # same weights
    from chatforge import load_model

    lm = load_model(str(out))
    base = load_model(str(tiny_gpt2_dir))
    got = sum(float(p.detach().double().abs().sum()) for p in lm.model.parameters())
    assert got == pytest.approx(ranks[0]["sum"], rel=1e-6)
    assert got != pytest.approx(
        sum(float(p.detach().double().abs().sum()) for p in base.model.parameters())
    )
    state = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["world"] == 2
    assert (out / "checkpoints" / "step-00000003" / "rng-rank1.pt").exists()
