"""Acceptance check for resumable batch generation: SIGKILL a run halfway, rerun, verify.

Writes N chitchat openings to a .jsonl, starts ``chatforge generate`` on them,
kills it with SIGKILL once about half the rows are in the output, reruns the
same command, and checks that the output then holds every id exactly once and
that the rerun generated only the missing records.

    python bench/kill_resume.py --prompts 200 --batch-size 16 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_generate import chitchat_openings  # noqa: E402


def count_rows(path: Path) -> int:
    """Whole lines in the output (a torn last line is not counted)."""
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dir", default="bench/results/kill_resume")
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    inp, out = work / "chitchat.jsonl", work / "answers.jsonl"
    out.unlink(missing_ok=True)
    records = chitchat_openings(args.prompts)
    inp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cmd = [sys.executable, "-m", "chatforge", "generate", str(inp), "-o", str(out)]
    cmd += ["--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--temperature", "0", "--no-progress"]
    print("command:", " ".join(cmd))

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and count_rows(out) < len(records) // 2:
        time.sleep(0.2)
    if proc.poll() is not None:
        print("the run ended before it could be killed:", proc.stderr.read(), file=sys.stderr)
        return 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = count_rows(out)
    print(f"killed (SIGKILL) after {time.perf_counter() - t0:.1f} s with {first} rows written")

    t1 = time.perf_counter()
    rerun = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False)
    summary = rerun.stderr.strip().splitlines()[-1] if rerun.stderr.strip() else ""
    print(f"rerun ({time.perf_counter() - t1:.1f} s): {summary}")

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    ids = [r["id"] for r in rows]
    want = [r["id"] for r in records]
    result = {
        "records": len(records),
        "rows_before_kill": first,
        "rows_after_rerun": len(rows),
        "unique_ids": len(set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "all_ids_present": sorted(ids) == sorted(want),
        "errors": sum(r.get("error") is not None for r in rows),
        "rerun_summary": summary,
        "rerun_exit_code": rerun.returncode,
    }
    print(json.dumps(result, indent=2))
    ok = (
        rerun.returncode == 0
        and result["duplicates"] == 0
        and result["all_ids_present"]
        and f"{len(records) - first} done" in summary
        and f"{first} skipped" in summary
    )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
