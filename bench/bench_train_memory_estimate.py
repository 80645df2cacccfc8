"""The memory estimate against the real peak, over a range of shapes.

Each setting trains ``--steps`` optimizer steps in a fresh child process (``--force``,
so the estimate does not stop it) on a text corpus that fills every row, and reports
the estimate the trainer printed (``Trainer.mem_estimate``) next to the child's peak
resident memory (``VmHWM``). A watchdog in the child stops it at ``--kill-gb``; such a
row reads "killed" (its peak is then at least that). The estimate must not be below
the peak (ratio estimate / peak >= 1), nor far above it.

    python bench/bench_train_memory_estimate.py               # the default grid
    python bench/bench_train_memory_estimate.py --only gpt2   # from-scratch GPT-2 rows only
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

est = {}
def watch():
    while True:
        if vm("VmRSS:") > limit_kb:
            print(json.dumps({"killed": True, "peak_gb": vm("VmHWM:") / 2**20, **est}), flush=True)
            os._exit(3)
        time.sleep(0.02)

threading.Thread(target=watch, daemon=True).start()
args = json.loads(sys.argv[1])
from chatforge.training import memory
from chatforge.training.config import TrainConfig
from chatforge.training.trainer import Trainer
real = memory.estimate
def spy(*a, **k):
    e = real(*a, **k)
    est["estimate_gb" if not e.checkpointing else "estimate_ckpt_gb"] = e.total / 2**30
    return e
memory.estimate = spy
import chatforge.training.trainer  # noqa
t = Trainer(TrainConfig(**args))
t0 = time.perf_counter()
res = t.run()
e = t.mem_estimate
print(json.dumps({"killed": False, "peak_gb": vm("VmHWM:") / 2**20,
                  "estimate_gb": e.total / 2**30, "checkpointing": e.checkpointing,
                  "seconds": time.perf_counter() - t0}), flush=True)
"""


def write_corpus(path: Path, chars: int) -> Path:
    from chatforge.training.data import load_chitchat

    out, n = [], 0
    for conv in load_chitchat():
        for m in conv:
            out.append(m.content)
            n += len(m.content) + 1
        if n > chars:
            break
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def write_tokenizer(path: Path) -> Path:
    """The tests' tiny byte-level tokenizer (400 tokens): the runs measure the model's
    context-dependent memory, not a 49k-token LM head."""
    import shutil

    shutil.copytree(Path(__file__).resolve().parents[1] / "tests/fixtures/tiny-tokenizer", path)
    return path


GRID = [  # (what, context, batch): gpt2 = a new 4 x 256 GPT-2; lora/full = SmolLM2-135M
    ("gpt2", 128, 8),
    ("gpt2", 1024, 8),
    ("gpt2", 2048, 4),
    ("gpt2", 4096, 1),
    ("gpt2", 4096, 2),
    ("lora", 256, 4),
    ("lora", 1024, 4),
    ("full", 256, 4),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--kill-gb", type=float, default=9.0)
    ap.add_argument("--only", default=None, help="gpt2, lora or full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-mem-est-"))
    corpus = write_corpus(work / "corpus.txt", 400_000)
    tok = None
    results = []
    for what, ctx, batch in GRID:
        if args.only and what != args.only:
            continue
        cfg = dict(
            data=[str(corpus)], output=str(work / f"out-{what}-{ctx}-{batch}"),
            context=ctx, batch_size=batch, max_steps=args.steps, eval_every=0, save_every=0,
            progress=False, precision="fp32", force=True, threads=args.threads,
        )  # fmt: skip
        if what == "gpt2":
            tok = tok or write_tokenizer(work / "tok")
            cfg.update(init="gpt2", tokenizer=str(tok), n_layer=4, n_embd=256, n_head=4)
        else:
            cfg.update(model="smollm2", lora=what == "lora")
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(cfg), str(args.kill_gb)],
            capture_output=True,
            text=True,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        r = json.loads(lines[-1]) if lines else {"error": proc.stderr.strip()[-300:]}
        r.update(what=what, context=ctx, batch=batch)
        if "estimate_gb" in r and "peak_gb" in r:
            r["ratio"] = round(r["estimate_gb"] / r["peak_gb"], 2)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
