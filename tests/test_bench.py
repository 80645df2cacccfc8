"""`chatforge bench` runs end to end (tiny model, quick) and writes the documented JSON."""

from __future__ import annotations

import json
import math

import pytest

from chatforge.cli.app import main

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

KEYS = {
    "engine",
    "dtype",
    "quantize",
    "batch",
    "prefill_tok_s",
    "ttft_ms",
    "decode_tok_s",
    "peak_rss_mb",
}


def test_bench_json_shape(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--model",
            str(tiny_llama_dir),
            "--quick",
            "--only",
            "transformers fp32",
            "--only",
            "chatforge fp32 int8",
            "--no-quality",
            "--json",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["machine"]["cpus"] >= 1
    rows = data["results"]
    assert {(r["engine"], r["quantize"], r["batch"]) for r in rows} == {
        ("transformers", "none", 1),
        ("transformers", "none", 8),
        ("chatforge", "int8", 1),
        ("chatforge", "int8", 8),
    }
    for r in rows:
        assert KEYS <= set(r)
        assert r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "Decode benchmark" in capsys.readouterr().out


def test_bench_rejects_unknown_setting(tiny_llama_dir, capsys):
    code = main(["bench", "--model", str(tiny_llama_dir), "--only", "chatforge fp64"])
    assert code == 2
    assert "--only matched no setting" in capsys.readouterr().err


def test_quality_check_rows(tiny_llama_dir):
    from chatforge.bench.quality import quality_check
    from chatforge.models import load_model

    rows = quality_check(load_model(str(tiny_llama_dir), fast=False), conversations=2)  # as the CLI
    assert [(r["dtype"], r["quantize"]) for r in rows][:4] == [
        ("fp32", "none"),
        ("bf16", "none"),
        ("fp32", "int8"),
        ("bf16", "int8"),
    ]
    assert rows[0]["change"] == 0 and rows[0]["passes"]
    assert all(math.isfinite(r["perplexity"]) and r["tokens"] > 0 for r in rows)


def test_decode_rate_times_the_decode_steps_of_one_run():
    """The rate came from a 1-token run subtracted from an n-token one: under load (the
    suite in two processes) that gave NaN for a tiny model. Now the steps of one run."""
    from chatforge.bench.decode import decode_rate

    # 3 tokens a sequence: the prefill step gives the first, two decode steps the rest.
    assert decode_rate(2, 3, [0.5, 1.0, 1.5, 2.0]) == pytest.approx(2 * 2 / 1.0)
    assert math.isnan(decode_rate(2, 3, [1.0, 2.0]))  # fewer steps than tokens
    assert math.isnan(decode_rate(2, 1, [1.0]))  # no decode step
    assert math.isnan(decode_rate(2, 3, [1.0, 1.0, 1.0]))  # no time passed


@pytest.mark.parametrize("fast", [True, False])
def test_each_engine_reports_a_stamp_per_step(tiny_llama_dir, fast):
    from chatforge.bench.decode import _ChatforgeRun, _prompts, _TransformersRun
    from chatforge.models import load_model

    loaded = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none", fast=fast)
    run = _ChatforgeRun(loaded) if fast else _TransformersRun(loaded)
    stamps = run.generate(_prompts(loaded, 3), 6)
    # One step a token: the first from the prompts' step (short prompts: one), then decode.
    assert len(stamps) == 6
    assert stamps == sorted(stamps)
