"""Batch generation (``generate_batch`` and ``chatforge generate``) on the tiny random models."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest

from chatforge import GenerationConfig, generate_batch, load_model
from chatforge.batch import BatchStopped, read_records
from chatforge.batch.output import CSV_COLUMNS, RowWriter
from chatforge.cli.app import main

GREEDY = GenerationConfig(temperature=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


def rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- readers ---------------------------------------------------------------------


def test_readers_ids_fields_and_bad_lines(tmp_path):
    txt = write(tmp_path / "p.txt", "first\n\nsecond\n")
    assert [(r.id, r.fields, r.source.rsplit(":", 1)[1]) for r in read_records(txt)] == [
        (0, {"text": "first"}, "1"),
        (1, {"text": "second"}, "3"),
    ]
    jsonl = write(tmp_path / "p.jsonl", '{"id": "a", "q": 1}\n{oops\n"plain"\n[1]\n')
    recs = list(read_records(jsonl))
    assert [r.id for r in recs] == ["a", 1, 2, 3]
    assert recs[1].error.startswith(f"{jsonl}:2: not valid JSON")
    assert recs[2].fields == {"text": "plain"} and recs[2].error is None
    assert "must be an object or a string (got list)" in recs[3].error
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert "bad.txt:2: not UTF-8 text" in list(read_records(bad))[1].error
    c = write(tmp_path / "p.csv", 'id,foods\nx7,"rice,\nbeans"\n,soup\nonly,two,many\n')
    recs = list(read_records(c))
    assert [r.id for r in recs] == ["x7", 1, 2]
    assert recs[0].fields["foods"] == "rice,\nbeans"
    assert recs[2].error == f"{c}:5: the row has 3 fields but the header has 2"


# -- the runner ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_each_input_type(kind, tmp_path, llama):
    src = {
        "txt": "Hello there\nWhat is up\n",
        "jsonl": '{"text": "Hello there"}\n{"text": "What is up"}\n',
        "csv": "text\nHello there\nWhat is up\n",
    }[kind]
    inp = write(tmp_path / f"in.{kind}", src)
    out = tmp_path / "out.jsonl"
    s = generate_batch(llama, inp, out, config=GREEDY, progress=False)
    assert (s.total, s.done, s.errors, s.skipped) == (2, 2, 0, 0)
    got = rows(out)
    assert [r["id"] for r in got] == [0, 1]
    assert [r["prompt"] for r in got] == ["Hello there", "What is up"]
    for r in got:
        assert r["error"] is None and isinstance(r["output"], str)
        assert r["completion_tokens"] == 6 and r["finish_reason"] == "length"
        assert r["params"]["max_new_tokens"] == 6 and r["params"]["temperature"] == 0
        assert r["model"]["architecture"] == "LlamaForCausalLM"
    assert s.completion_tokens == 12


def test_template_missing_field_long_prompt_and_malformed_line(tmp_path, llama):
    lines = [
        json.dumps({"id": "a", "foods": "rice", "comment": "good"}),
        json.dumps({"id": "b", "foods": "soup"}),  # no comment
        "{not json",
        json.dumps({"id": "d", "foods": "bean " * 200, "comment": "long"}),  # > 128 ctx
        json.dumps({"id": "e", "foods": "tea", "comment": "hot"}),
    ]
    inp = write(tmp_path / "in.jsonl", "\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    s = generate_batch(
        llama, inp, out, template="Order: {foods}. Comment: {comment}.", config=GREEDY,
        progress=False, batch_size=2,
    )  # fmt: skip
    assert (s.done, s.errors) == (2, 3)
    got = rows(out)
    assert [r["id"] for r in got] == ["a", "b", 2, "d", "e"]  # input order
    assert got[0]["prompt"] == "Order: rice. Comment: good."
    assert "needs field 'comment', which the record lacks (it has: id, foods)" in got[1]["error"]
    assert got[2]["error"].startswith(f"{inp}:3: not valid JSON")
    assert "context is 128 tokens" in got[3]["error"]
    assert got[4]["error"] is None and got[4]["output"] is not None
    assert len(s.error_messages) == 3


def test_fail_fast_stops_before_writing_the_bad_row(tmp_path, llama):
    inp = write(tmp_path / "in.jsonl", '{"text": "hi"}\n{"text": "yo"}\n{bad\n{"text": "x"}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(BatchStopped, match=r"in.jsonl:3: not valid JSON.*--fail-fast"):
        generate_batch(llama, inp, out, config=GREEDY, fail_fast=True, progress=False)
    assert [r["id"] for r in rows(out)] == [0, 1]


def test_output_order_is_input_order_with_small_batches(tmp_path, gpt2):
    prompts = [f"prompt number {i} " + "word " * (i % 5) for i in range(11)]
    inp = write(tmp_path / "in.txt", "\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    cfg = GenerationConfig(temperature=0, max_new_tokens=8)
    generate_batch(gpt2, inp, out, config=cfg, batch_size=4, progress=False)
    got = rows(out)
    assert [r["id"] for r in got] == list(range(11))
    assert [r["prompt"] for r in got] == prompts
    # Batched greedy output equals one-at-a-time output.
    one = tmp_path / "one.jsonl"
    generate_batch(gpt2, inp, one, config=cfg, batch_size=1, progress=False)
    assert [r["output"] for r in rows(one)] == [r["output"] for r in got]


def test_resume_skips_finished_ids_and_cuts_a_torn_line(tmp_path, llama):
    inp = write(tmp_path / "in.txt", "".join(f"prompt {i}\n" for i in range(8)))
    full = tmp_path / "full.jsonl"
    generate_batch(llama, inp, full, config=GREEDY, progress=False)
    finished = full.read_text().splitlines(keepends=True)
    # A crash after rows 0, 1, 2 and 5 were written, tearing row 6 halfway.
    out = tmp_path / "out.jsonl"
    torn = finished[6][: len(finished[6]) // 2]
    out.write_text("".join(finished[i] for i in (0, 1, 2, 5)) + torn)
    s = generate_batch(llama, inp, out, config=GREEDY, progress=False)
    assert (s.total, s.done, s.skipped, s.errors) == (8, 4, 4, 0)
    assert s.torn_bytes == len(torn.encode())
    got = rows(out)
    ids = [r["id"] for r in got]
    assert ids == [0, 1, 2, 5, 3, 4, 6, 7]
    assert len(set(ids)) == len(ids)
    by_id = {r["id"]: r["output"] for r in got}
    assert by_id == {json.loads(x)["id"]: json.loads(x)["output"] for x in finished}
    # Running again does nothing.
    s = generate_batch(llama, inp, out, config=GREEDY, progress=False)
    assert (s.done, s.skipped) == (0, 8)
    assert len(rows(out)) == 8


def test_resume_keeps_a_whole_row_that_lost_its_newline(tmp_path, llama):
    inp = write(tmp_path / "in.txt", "a\nb\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 0, "output": "kept"}))
    s = generate_batch(llama, inp, out, config=GREEDY, progress=False)
    assert (s.done, s.skipped, s.torn_bytes) == (1, 1, 0)
    assert [r["id"] for r in rows(out)] == [0, 1]
    assert rows(out)[0]["output"] == "kept"


def test_n_samples_seeded_runs_reproduce(tmp_path, llama):
    inp = write(tmp_path / "in.txt", "Hello there\nWhat is up\n")
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=8, seed=7)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    generate_batch(llama, inp, a, config=cfg, n=3, progress=False)
    generate_batch(llama, inp, b, config=cfg, n=3, batch_size=1, progress=False)
    ra, rb = rows(a), rows(b)
    assert [r["outputs"] for r in ra] == [r["outputs"] for r in rb]
    for r in ra:
        assert len(r["outputs"]) == 3 and r["output"] == r["outputs"][0]
        assert len(set(r["outputs"])) > 1  # different seeds per sample
        assert r["n"] == 3 and len(r["finish_reasons"]) == 3
    # Sample j is a one-sample run with seed 7 + j (GenerationConfig.for_sample).
    for j in range(3):
        one = tmp_path / f"one{j}.jsonl"
        generate_batch(llama, inp, one, config=cfg.replace(seed=7 + j), progress=False)
        assert [r["output"] for r in rows(one)] == [r["outputs"][j] for r in ra]


def test_csv_output_and_resume(tmp_path, llama):
    inp = write(tmp_path / "in.csv", 'id,q\nk1,"line one"\nk2,"two, with comma"\nk3,three\n')
    out = tmp_path / "out.csv"
    s = generate_batch(llama, inp, out, template="Q: {q}", config=GREEDY, progress=False)
    assert s.done == 3
    got = rows(out)
    assert list(got[0]) == list(CSV_COLUMNS)
    assert [r["id"] for r in got] == ["k1", "k2", "k3"]
    assert got[1]["prompt"] == "Q: two, with comma"
    assert json.loads(got[0]["params"])["max_new_tokens"] == 6
    # Tear the last row, rerun: only k3 is redone.
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 20])
    s = generate_batch(llama, inp, out, template="Q: {q}", config=GREEDY, progress=False)
    assert (s.done, s.skipped) == (1, 2) and s.torn_bytes > 0
    assert [r["id"] for r in rows(out)] == ["k1", "k2", "k3"]


def test_python_records_and_duplicate_ids(tmp_path, llama):
    out = tmp_path / "out.jsonl"
    items = ["plain text", {"id": "x", "text": "a"}, {"id": "x", "text": "b"}]
    s = generate_batch(llama, items, out, config=GREEDY, progress=False)
    assert (s.done, s.errors) == (2, 1)
    assert "duplicate id 'x'" in rows(out)[2]["error"]


def test_second_writer_on_the_same_file_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    with RowWriter(out):
        with pytest.raises(Exception, match="being written by another run"):
            RowWriter(out)


# -- the CLI ---------------------------------------------------------------------


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    old = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        code = main(argv)
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_end_to_end(tmp_path, capsys, tiny_llama_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    inp = write(tmp_path / "in.jsonl", '{"q": "hi"}\n{"z": 1}\n{"q": "there"}\n')
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(inp), "-o", str(out), "--model", str(model)]
    argv += ["--template", "Say {q}", "--max-new-tokens", "4", "-t", "0", "--system", "Be brief."]
    code, stdout, err = cli(argv, capsys)
    assert code == 0, err
    assert "3 records: 2 done, 1 errors, 0 skipped (already in output)" in err
    assert "needs field 'q'" in err and "errors by kind: 1 missing field" in err
    got = rows(out)
    assert [r["id"] for r in got] == [0, 1, 2] and got[2]["prompt"] == "Say there"
    assert got[0]["settings"] == {
        "model": str(model),
        "api_base": None,
        "template": "Say {q}",
        "system": "Be brief.",
        "format": None,
        "n": 1,
    }
    # All rows there: said so, and the model is not even loaded (its directory is gone).
    shutil.rmtree(model)
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    assert "all 3 records already have a row" in err and "not loaded" in err
    assert len(rows(out)) == 3


def test_a_finished_output_does_not_load_the_model(tmp_path, llama):
    inp = write(tmp_path / "in.txt", "a\nb\n")
    out = tmp_path / "out.jsonl"
    generate_batch(llama, inp, out, config=GREEDY, progress=False)

    def loader():
        raise AssertionError("loaded the model for nothing")

    summary = generate_batch(loader, inp, out, config=GREEDY, progress=False)
    assert (summary.total, summary.skipped, summary.done) == (2, 2, 0)
    write(inp, "a\nb\nc\n")  # one more record: now the model is needed
    summary = generate_batch(lambda: llama, inp, out, config=GREEDY, progress=False)
    assert (summary.done, summary.skipped) == (1, 2)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["/nonexistent/in.txt"], "input file /nonexistent/in.txt does not exist"),
        (["{tmp}/in.xml"], "has an unknown extension '.xml'"),
        (["{tmp}/in.txt", "-o", "{tmp}/out.parquet"], "unknown extension '.parquet'"),
        (["{tmp}/in.txt", "--temperature", "-1"], "--temperature must be >= 0"),
        (["{tmp}/in.txt", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["{tmp}/in.txt", "--n", "0"], "--n must be >= 1"),
        (["{tmp}/in.txt", "--bogus"], "No such option: --bogus"),
        (["{tmp}/in.txt", "--template", "{}"], "template fields must be named"),
        (["{tmp}/in.txt", "--template", "{a"], "bad template"),
        (["{tmp}/in.txt", "--template-file", "/nope.txt"], "template file /nope.txt does not"),
        # Placeholders are plain field names: nothing in them is evaluated (issue 22.7).
        (
            ["{tmp}/in.txt", "--template", "Q: {foods.__class__}"],
            "template placeholder {foods.__class__} is not a plain field name: attribute",
        ),
        (["{tmp}/in.txt", "-T", "Q: {text[0]}"], "placeholder {text[0]} is not a plain field"),
        (["{tmp}/in.txt", "-T", "Q: {text!r}"], "{text!r} is not a plain field name: conv"),
        (["{tmp}/in.txt", "-T", "{text:.2f}"], "{text:.2f} is not a plain field name: format"),
        (["{tmp}/in.txt", "-T", "{text:>{w}}"], "placeholder {text:>{w}} is not a plain"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, needle, tmp_path, capsys, tiny_llama_dir):
    write(tmp_path / "in.txt", "hi\n")
    write(tmp_path / "in.xml", "hi\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.jsonl")]
    code, stdout, err = cli(["generate", *args, "--model", str(tiny_llama_dir)], capsys)
    assert code == 2, err
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_cli_fail_fast_exit_2(tmp_path, capsys, tiny_llama_dir):
    inp = write(tmp_path / "in.jsonl", '{"text": "hi"}\n{oops\n')
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(inp), "-o", str(out), "--model", str(tiny_llama_dir), "--fail-fast"]
    code, _, err = cli([*argv, "--max-new-tokens", "3", "--no-progress"], capsys)
    assert code == 2
    assert "in.jsonl:2: not valid JSON" in err and "--fail-fast" in err
    assert len(rows(out)) == 1


# -- ids that must not collide, storage faults (regressions) -----------------------


def test_index_ids_never_collide_with_explicit_ids(tmp_path, llama):
    # Record 0 has no id (id 0 by index); record 2 says "id": 0, record 3 says "#1".
    inp = write(
        tmp_path / "in.jsonl",
        '{"text": "a"}\n{"text": "b"}\n{"id": 0, "text": "c"}\n{"id": "#1", "text": "d"}\n',
    )
    out = tmp_path / "out.jsonl"
    s = generate_batch(llama, inp, out, config=GREEDY, progress=False)
    assert (s.done, s.errors) == (4, 0)  # nothing skipped, nothing taken for a duplicate
    got = rows(out)
    assert [r["id"] for r in got] == [0, 1, 0, "#1"]  # the id shown is still the index
    assert len({r["key"] for r in got}) == 4
    # A rerun after a crash that kept only record 2 (explicit id 0) redoes records 0, 1, 3.
    out.write_text(json.dumps(got[2]) + "\n")
    s = generate_batch(llama, inp, out, config=GREEDY, progress=False)
    assert (s.done, s.skipped) == (3, 1)
    assert sorted(r["source"].rsplit(":", 1)[1] for r in rows(out)) == ["1", "2", "3", "4"]


def test_csv_index_ids_never_collide_and_old_csv_files_resume(tmp_path, llama):
    from chatforge.batch.output import LEGACY_CSV_COLUMNS

    inp = write(tmp_path / "in.csv", "id,text\n,first\n0,second\n")
    out = tmp_path / "out.csv"
    s = generate_batch(llama, inp, out, config=GREEDY, progress=False)
    assert (s.done, s.errors, s.skipped) == (2, 0, 0)
    assert [r["key"] for r in rows(out)] == ["#0", "0"]
    # A file written before the key column: resumed by its bare ids, as before.
    old = tmp_path / "old.csv"
    with open(old, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(LEGACY_CSV_COLUMNS)
        w.writerow(["0"] + [""] * (len(LEGACY_CSV_COLUMNS) - 1))
    s = generate_batch(llama, inp, old, config=GREEDY, progress=False)
    assert s.skipped == 2 and s.done == 0


def _fail_writes_to(path: Path, monkeypatch, after: int) -> None:
    """Make ``os.write`` to ``path`` write half its bytes, then fail with ENOSPC,
    from the ``after``-th write on (other files are written normally)."""
    import errno
    import os

    from chatforge.batch import output as output_mod

    real_write, calls = os.write, [0]

    def write(fd: int, data) -> int:
        try:
            ours = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            ours = False
        if not ours:
            return real_write(fd, data)
        calls[0] += 1
        if calls[0] <= after:
            return real_write(fd, data)
        real_write(fd, bytes(data[: len(data) // 2]))  # a torn row on the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_mod.os, "write", write)


def test_cli_disk_full_is_one_line_keeps_rows_and_resumes(
    tmp_path, capsys, monkeypatch, tiny_llama_dir
):
    inp = write(tmp_path / "in.txt", "".join(f"prompt {i}\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    out.write_text("")
    argv = ["generate", str(inp), "-o", str(out), "--model", str(tiny_llama_dir)]
    argv += ["--max-new-tokens", "3", "-t", "0", "--no-progress", "--batch-size", "1"]
    _fail_writes_to(out, monkeypatch, after=2)
    code, _, err = cli(argv, capsys)
    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "the disk is full" in err and "2 rows written so far are kept" in err
    assert "rerun" in err
    assert len(rows(out)) == 2  # the torn third row was cut; every line parses
    assert out.read_text().endswith("\n")
    monkeypatch.undo()
    code, _, err = cli(argv, capsys)
    assert code == 0 and "4 done, 0 errors, 2 skipped" in err
    assert [r["id"] for r in rows(out)] == list(range(6))


def test_disk_full_writing_the_csv_header_closes_the_file(tmp_path, monkeypatch):
    out = tmp_path / "out.csv"
    out.write_text("")
    _fail_writes_to(out, monkeypatch, after=0)
    with pytest.raises(Exception, match="the disk is full; the 0 rows"):
        RowWriter(out)
    monkeypatch.undo()
    assert out.read_bytes() == b""
    with RowWriter(out):  # not left locked by a leaked handle
        pass


# -- issue 22: settings fingerprint, runs where nothing succeeds, CSV quotes, templates --


def test_cli_resume_with_other_settings_is_refused(tmp_path, capsys, tiny_llama_dir, tiny_gpt2_dir):
    inp = write(tmp_path / "in.txt", "".join(f"prompt {i}\n" for i in range(4)))
    out = tmp_path / "out.jsonl"
    base = ["generate", str(inp), "-o", str(out), "--no-progress", "--max-new-tokens", "3"]
    same = ["-t", "0.7", "--seed", "1", "-T", "A: {text}"]
    first = [*base, "--model", str(tiny_llama_dir), *same]
    code, _, err = cli(first, capsys)
    assert code == 0, err
    # Killed after two rows, halfway through the third.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:20])
    before = out.read_bytes()
    other = [
        (["--model", str(tiny_gpt2_dir), *same], "model=", "tiny-llama", "tiny-gpt2"),
        (["--model", str(tiny_llama_dir), *same, "-t", "0.2"], "", "temperature=0.7",
         "temperature=0.2"),
        (["--model", str(tiny_llama_dir), *same, "-T", "B: {text}"], "", "template='A: {text}'",
         "template='B: {text}'"),
        (["--model", str(tiny_llama_dir), *same, "--system", "Be brief."], "", "system=none",
         "system='Be brief.'"),
        (["--model", str(tiny_llama_dir), *same, "--n", "2"], "", "n=1", "n=2"),
        (["--model", str(tiny_llama_dir), *same, "--format", "text"], "", "format=none",
         "format=text"),
    ]  # fmt: skip
    for flags, common, theirs, mine in other:
        code, _, err = cli([*base, *flags], capsys)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        head, tail = err.split("; this run has ")
        assert head.startswith(f"error: {out} holds 2 rows made with {common}"), err
        assert theirs in head and mine in tail and mine not in head, err
        assert tail.rstrip().endswith("use another --output, or --force-resume to add to it")
        assert out.read_bytes() == before  # refused: not even the torn row was cut
    # The same settings resume as before.
    code, _, err = cli(first, capsys)
    assert code == 0 and "2 done, 0 errors, 2 skipped" in err and "cut a torn" in err, err
    # --force-resume adds to it, and says nothing about the mix.
    write(inp, "".join(f"prompt {i}\n" for i in range(5)))
    code, _, err = cli([*first, "-T", "B: {text}", "--force-resume"], capsys)
    assert code == 0 and "1 done, 0 errors, 4 skipped" in err, err
    assert [r["settings"]["template"] for r in rows(out)] == ["A: {text}"] * 4 + ["B: {text}"]
    # A finished output made with other settings is refused too (not "nothing to do").
    code, _, err = cli(first, capsys)
    assert code == 2 and f"{out} holds 1 row made with template='B: {{text}}'" in err, err


def test_settings_fingerprint_csv_and_older_outputs(tmp_path, llama, gpt2):
    from chatforge.batch.output import KEYED_CSV_COLUMNS
    from chatforge.errors import ChatforgeError

    inp = write(tmp_path / "in.txt", "a\nb\nc\n")
    out = tmp_path / "out.csv"
    generate_batch(llama, inp, out, config=GREEDY, progress=False)
    assert json.loads(rows(out)[0]["settings"])["template"] is None
    hotter = GenerationConfig(temperature=0.5, max_new_tokens=6)
    with pytest.raises(ChatforgeError, match=r"holds 3 rows made with .*temperature=0"):
        generate_batch(llama, inp, out, config=hotter, progress=False)
    # A model given as a function is checked once loaded, before any row is written.
    write(inp, "a\nb\nc\nd\n")
    with pytest.raises(ChatforgeError, match="holds 3 rows made with model="):
        generate_batch(lambda: gpt2, inp, out, config=GREEDY, progress=False)
    assert len(rows(out)) == 3
    s = generate_batch(lambda: gpt2, inp, out, config=GREEDY, progress=False, force_resume=True)
    assert (s.done, s.skipped) == (1, 3)
    # A file from before rows had settings resumes whatever the settings, keeping its header.
    old = tmp_path / "old.csv"
    with open(old, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(KEYED_CSV_COLUMNS)
        w.writerow(["0"] + [""] * (len(KEYED_CSV_COLUMNS) - 2) + ["#0"])
    s = generate_batch(llama, inp, old, config=hotter, progress=False)
    assert (s.done, s.skipped) == (3, 1)
    assert list(rows(old)[0]) == list(KEYED_CSV_COLUMNS)


def test_cli_exits_1_when_no_record_succeeds(tmp_path, capsys, tiny_llama_dir):
    inp = write(tmp_path / "in.jsonl", '{"z": 1}\n{oops\n{"z": 2}\n')
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(inp), "-o", str(out), "--model", str(tiny_llama_dir)]
    code, _, err = cli([*argv, "-T", "Q: {q}", "--max-new-tokens", "3", "--no-progress"], capsys)
    assert code == 1, err
    assert "errors by kind: 2 missing field, 1 unreadable record" in err
    assert "3 records: 0 done, 3 errors" in err
    assert "error: no record succeeded: all 3 records this run tried failed" in err
    assert [r["error"] is not None for r in rows(out)] == [True] * 3  # the rows are written


def test_csv_unterminated_quote_is_one_malformed_record(tmp_path, capsys, tiny_llama_dir):
    inp = write(tmp_path / "in.csv", 'prompt\n"unterminated, quote\nnext\n')
    recs = list(read_records(inp))
    assert [r.source for r in recs] == [f"{inp}:2", f"{inp}:3"]
    assert recs[0].error.startswith(f"{inp}:2: malformed CSV row (a quote in it is never closed")
    assert recs[1].error is None and recs[1].fields == {"prompt": "next"}
    # A quote closed on a later line is still one record over several lines.
    ok = write(tmp_path / "ok.csv", 'prompt\n"two\nlines"\nlast')
    assert [r.fields["prompt"] for r in read_records(ok)] == ["two\nlines", "last"]
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(inp), "-o", str(out), "--model", str(tiny_llama_dir)]
    code, _, err = cli([*argv, "--max-new-tokens", "3", "--no-progress"], capsys)
    assert code == 0, err
    assert f"{inp}:2: malformed CSV row" in err and "1 unreadable record" in err
    got = rows(out)
    assert [r["source"] for r in got] == [f"{inp}:2", f"{inp}:3"]
    assert got[0]["error"] is not None and got[1]["prompt"] == "next"
    bad_header = write(tmp_path / "bad.csv", '"prompt\nnext\n')
    argv = ["generate", str(bad_header), "-o", str(tmp_path / "bad.jsonl"), *argv[4:]]
    code, _, err = cli([*argv, "--no-progress"], capsys)
    assert code == 2 and f"{bad_header}:1: the CSV header has a quote that is never" in err


def test_template_inserts_values_as_text():
    from chatforge.batch import PromptTemplate

    t = PromptTemplate("{{literal}} Q: {q} {q} }}")
    assert t.fields == ("q",)
    assert t.render({"q": "{x.__class__}"}) == "{literal} Q: {x.__class__} {x.__class__} }"
    assert t.render({"q": 3.5}) == "{literal} Q: 3.5 3.5 }"
