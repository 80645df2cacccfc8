"""Training progress where the output is not a terminal (a log file, nohup, CI): plain
lines as the run goes, not one bar drawn only when it ends."""

from __future__ import annotations

import io

from rich.console import Console

from chatforge.training.progress import PLAIN_EVERY_S, TrainProgress


def _progress(terminal: bool) -> tuple[TrainProgress, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200)
    return TrainProgress(console), out


def test_a_log_file_gets_a_line_as_training_goes_on():
    prog, out = _progress(terminal=False)
    prog.start(total_steps=10, max_minutes=None, done=0)
    times = [1, 2, PLAIN_EVERY_S + 1.5, PLAIN_EVERY_S + 2, 3 * PLAIN_EVERY_S, 3 * PLAIN_EVERY_S + 1]
    for step, t in enumerate(times, start=1):
        prog.update(step, 2.5 - step / 10, 80.0, t)
        if step == 3:
            assert out.getvalue().count("\n") == 2  # printed while running, not at the end
    prog.update(10, 1.25, 81.0, 3 * PLAIN_EVERY_S + 2)  # the last step always
    prog.stop()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "training: step 1/10",
        "training: step 3/10",
        "training: step 5/10",
        "training: step 10/10",
    ]
    assert lines[1] == "training: step 3/10, loss 2.2000, 80 tok/s, 0:00:32 elapsed, 0:01:14 left"
    assert lines[-1].endswith("0:01:32 elapsed, 0:00:00 left")


def test_a_time_limited_run_counts_steps_and_ends_at_its_limit():
    prog, out = _progress(terminal=False)
    prog.start(total_steps=None, max_minutes=1.0, done=0)
    prog.update(1, 3.0, 50.0, 5.0)
    prog.update(2, 2.9, 50.0, 10.0)
    prog.update(7, 2.5, 50.0, 60.0)  # the limit: the last line
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == [
        "training: step 1",
        "training: step 7",
    ]


def test_a_terminal_gets_the_bar_not_lines():
    prog, out = _progress(terminal=True)
    prog.start(total_steps=10, max_minutes=None, done=0)
    prog.update(1, 2.5, 80.0, 1.0)
    prog.stop()
    assert "training: step" not in out.getvalue() and "1/10" in out.getvalue()
