"""Peak memory of LoRA training steps on SmolLM2, in a fresh process per setting.

Each setting runs ``chatforge.training.train`` (LoRA, fp32 on CPU, packing on)
for ``--steps`` optimizer steps on chitchat conversations in a child process and
reports the child's peak resident memory (``VmHWM``). A watchdog thread in the
child stops it when its resident memory passes ``--kill-gb``, so a setting that
would take the machine down is reported as "killed" instead.

    python bench/bench_train_memory.py --context 256 512 1024 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys, threading, time
limit_kb = int(float(sys.argv[2]) * 1024 * 1024)

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
    return 0

def watch():
    while True:
        if vm("VmRSS:") > limit_kb:
            print(json.dumps({"killed": True, "peak_gb": vm("VmHWM:") / 2**20}), flush=True)
            os._exit(3)
        time.sleep(0.05)

threading.Thread(target=watch, daemon=True).start()
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args.pop("threads"))
from chatforge.training.config import TrainConfig
from chatforge.training.trainer import train
t0 = time.perf_counter()
res = train(TrainConfig(**args))
print(json.dumps({"killed": False, "peak_gb": vm("VmHWM:") / 2**20,
                  "seconds": time.perf_counter() - t0, "steps": res.steps}), flush=True)
"""


def write_data(path: Path, n: int) -> Path:
    from chatforge.training.data import load_chitchat

    with open(path, "w", encoding="utf-8") as f:
        for conv in load_chitchat()[:n]:
            f.write(json.dumps([m.content for m in conv]) + "\n")
    return path


def measure(data: Path, out: Path, context: int, batch: int, steps: int, args) -> dict:
    cfg = dict(
        data=[str(data)],
        output=str(out),
        model=args.model,
        lora=True,
        context=context,
        batch_size=batch,
        max_steps=steps,
        eval_every=0,
        save_every=0,
        progress=False,
        precision="fp32",
        overwrite=True,
        threads=args.threads,
    )
    if args.no_packing:
        cfg["packing"] = False
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg), str(args.kill_gb)],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--conversations", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kill-gb", type=float, default=15.0)
    ap.add_argument("--no-packing", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-mem-"))
    data = write_data(work / "chat.jsonl", args.conversations)
    results = []
    for ctx in args.context:
        r = measure(data, work / f"out-{ctx}", ctx, args.batch_size, args.steps, args)
        r.update(context=ctx, batch_size=args.batch_size)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
