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
