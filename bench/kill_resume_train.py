"""Acceptance check for resumable training: SIGKILL a run, ``--resume`` it, verify it finishes.

Starts ``chatforge train`` (a small GPT-2 from scratch on chitchat conversations),
SIGKILLs it as soon as a checkpoint past ``--kill-after`` steps is complete,
reruns the same command with ``--resume``, and checks that the rerun continued
from the newest complete checkpoint and wrote a loadable model.

    python bench/kill_resume_train.py --tokenizer tok/ --data chats.jsonl --steps 40
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--kill-after", type=int, default=10)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    out = Path(args.output or tempfile.mkdtemp(prefix="kill-resume-")) / "run"
    cmd = [sys.executable, "-m", "chatforge", "train", "--init", "gpt2"]
    cmd += ["--tokenizer", args.tokenizer, "--data", args.data, "--n-layer", "2"]
    cmd += ["--n-embd", "64", "--n-head", "2", "--context", "64", "--batch-size", "4"]
    cmd += ["--max-steps", str(args.steps), "--save-every", str(args.save_every)]
    cmd += ["--log-every", "1", "--quiet", "--output", str(out)]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    ck = out / "checkpoints"
    while proc.poll() is None:
        done = [p for p in ck.glob("step-*") if (p / "COMPLETE").exists()] if ck.is_dir() else []
        if any(int(p.name.split("-")[1]) >= args.kill_after for p in done):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    killed = sorted(p.name for p in ck.glob("step-*"))
    print(f"SIGKILLed (exit {proc.returncode}); checkpoints on disk: {killed}", flush=True)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    sys.stderr.write(again.stderr[-2000:])
    assert again.returncode == 0, "the resumed run failed"
    said = " ".join(again.stderr.split())
    assert "resuming from checkpoints/step-" in said, "the rerun did not say it resumed"
    from chatforge import load_model

    lm = load_model(str(out))
    print(f"OK: resumed and finished; {out} loads ({lm.info.prompt_format} format)")


if __name__ == "__main__":
    main()
