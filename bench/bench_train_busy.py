"""Training speed when another process holds a core: the free-core thread policy against
a fixed thread count (the old default, torch's one per core).

SmolLM2-135M LoRA, fp32, context ``--context``, batch ``--batch-size``, on a
conversation file cut from chitchat. Each setting runs in a fresh child process
for ``--steps`` optimizer steps; its rate is the tokens of steps 2.. over their
time (the first step carries one-off costs). Settings, back to back in one run:

- quiet: the machine as it is (shared machines are rarely quiet: the "others"
  column is how many cores other processes kept busy during the run, from /proc);
- busy: a ``python -c "while True: pass"`` loop pinned to our last CPU;
- busy-free: the same loop, not pinned.

for ``--threads auto`` (the default now) and ``--threads N`` (``--fixed``, default
2: what torch picks on two cores, the old default). We report tokens/s and the
ratio busy / quiet of each.

    python bench/bench_train_busy.py --steps 4 --json bench/results/train_busy.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
from chatforge.threads import proc_sampler
from chatforge.training.config import TrainConfig
from chatforge.training.trainer import train
stamps, tokens = [], []
sample = proc_sampler()
def on_step(step, row):
    stamps.append(time.perf_counter()); tokens.append(row["tokens"])
    if step == 1:
        global first
        first = sample()
res = train(TrainConfig(**args), on_step=on_step)
end = sample()
import os, torch
cores = len(os.sched_getaffinity(0))
ticks = max(1, end.total - first.total)
others = ((end.busy - first.busy) - (end.ours - first.ours)) * cores / ticks
rate = (tokens[-1] - tokens[0]) / (stamps[-1] - stamps[0])
print(json.dumps({"tokens_per_s": rate, "others": others, "threads_end": torch.get_num_threads()}))
"""


def write_data(path: Path, n: int) -> Path:
    from chatforge.training.data import load_chitchat

    with open(path, "w", encoding="utf-8") as f:
        for conv in load_chitchat()[:n]:
            f.write(json.dumps([m.content for m in conv]) + "\n")
    return path


def busy_loop(pinned: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "while True: pass"]
    if pinned:
        cpu = max(os.sched_getaffinity(0))
        cmd = ["taskset", "-c", str(cpu), *cmd]
    return subprocess.Popen(cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--fixed", type=int, default=2)
    ap.add_argument("--conditions", nargs="+", default=["quiet", "busy", "busy-free"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-busy-"))
    data = write_data(work / "chat.jsonl", 300)
    results = []
    for cond in args.conditions:
        for threads in (None, args.fixed):
            cfg = dict(
                data=[str(data)], output=str(work / f"o-{cond}-{threads}"), model="smollm2",
                lora=True, context=args.context, batch_size=args.batch_size,
                max_steps=args.steps, eval_every=0, save_every=0, progress=False,
                precision="fp32", threads=threads,
            )  # fmt: skip
            loop = busy_loop(cond == "busy") if cond != "quiet" else None
            try:
                time.sleep(0.5)
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True
                )
            finally:
                if loop is not None:
                    loop.kill()
                    loop.wait()
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            r = json.loads(lines[-1]) if lines else {"error": proc.stderr.strip()[-300:]}
            r.update(condition=cond, threads="auto" if threads is None else threads)
            results.append(r)
            print(json.dumps(r), flush=True)
    for t in ("auto", args.fixed):
        q = next((r for r in results if r["condition"] == "quiet" and r["threads"] == t), {})
        for cond in ("busy", "busy-free"):
            b = next((r for r in results if r["condition"] == cond and r["threads"] == t), {})
            if "tokens_per_s" in q and "tokens_per_s" in b:
                ratio = b["tokens_per_s"] / q["tokens_per_s"]
                print(f"threads={t}: {cond}/quiet = {ratio:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
