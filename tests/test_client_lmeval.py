"""lm-evaluation-harness against the server: ``local-completions`` matches lm-eval's ``hf``.

A small multiple-choice task (written to ``tmp_path``) is scored twice on the same
tiny weights: through our ``/v1/completions`` (echo + logprobs on token-id
prompts, what ``local-completions`` sends) and by lm-eval's own transformers
backend. Every choice's loglikelihood, its is-greedy flag and the accuracy metrics
must agree. One choice per model is the model's own greedy continuation, so the
is-greedy path is exercised with a ``True`` as well as ``False``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from chatforge import load_model  # noqa: E402
from chatforge.server import create_app  # noqa: E402
from serverkit import ServerThread  # noqa: E402

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

TASK = "chatforge_tiny_mc"
QUESTIONS = [
    ("What colour is the sky on a clear day?", [" blue", " green", " red"], 0),
    ("How many legs does a cat have?", [" two", " four", " six", " eight"], 1),
    ("Which of these is a fruit?", [" carrot", " potato", " apple"], 2),
    ("What is frozen water called?", [" ice", " steam", " sand", " glass"], 0),
    ("Which planet do we live on?", [" Mars", " Earth", " Venus"], 1),
]
PROMPT = "Question: {q}\nAnswer:"

# A task over a local JSON file: what both tasks below start with.
DATA_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
TASK_YAML = (
    DATA_YAML
    + """\
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
)


@pytest.fixture()
def offline(monkeypatch):
    """Nothing may reach the hub: set the env vars, and datasets' copies if already read."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def _greedy_choice(model_dir: Path, question: str) -> str | None:
    """Text of the model's greedy continuation that tokenizes back to the same ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ctx = PROMPT.format(q=question)
    ids = tok.encode(ctx)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )[0][len(ids) :].tolist()
    for k in (3, 2, 1):
        text = tok.decode(out[:k])
        if "\ufffd" not in text and tok.encode(ctx + text) == ids + out[:k]:
            return text
    return None


def _write_task(root: Path, model_dir: Path) -> tuple[Path, list[list[str]]]:
    task_dir = root / "tasks"
    task_dir.mkdir()
    rows = []
    for i, (q, choices, label) in enumerate(QUESTIONS):
        choices = list(choices)
        if i == 0:  # the model's own greedy answer: is_greedy must come back True
            greedy = _greedy_choice(model_dir, q)
            assert greedy is not None and greedy not in choices, greedy
            choices.append(greedy)
        rows.append({"question": q, "choices": choices, "label": label})
    data = task_dir / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (task_dir / f"{TASK}.yaml").write_text(
        TASK_YAML.format(task=TASK, data=data, cache=root / "hf-datasets-cache"),
        encoding="utf-8",
    )
    return task_dir, [r["choices"] for r in rows]


def _evaluate(model: str, model_args: dict, task_dir: Path, task: str = TASK):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=0,
    )
    assert out is not None
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


def _api_args(srv: ServerThread, model_dir: Path, **extra) -> dict:
    return {
        "base_url": srv.url + "/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(model_dir),
        "model": "tiny-served",
        "num_concurrent": 1,
        "max_retries": 1,
        **extra,
    }


def _hf_args(model_dir: Path) -> dict:
    return {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}


def _loglikelihoods(sample) -> list[tuple[float, bool]]:
    # resps: one [(loglikelihood, is_greedy)] per choice; filtered_resps: the same, flattened
    resps = [r[0] for r in sample["resps"]]
    assert [tuple(r) for r in sample["filtered_resps"]] == [tuple(r) for r in resps]
    return [(float(ll), bool(g)) for ll, g in resps]


@pytest.mark.parametrize(
    ("model_fixture", "batch_size"),
    [("tiny_llama_dir", 1), ("tiny_llama_dir", 4), ("tiny_gpt2_dir", 1)],
)
def test_local_completions_matches_hf_backend(
    request, tmp_path, offline, model_fixture, batch_size
):
    model_dir = request.getfixturevalue(model_fixture)
    task_dir, choices = _write_task(tmp_path, model_dir)
    lm = load_model(str(model_dir), dtype="fp32", quantize="none")
    assert lm.info.quantize == "none" and lm.info.dtype == "fp32", lm.info

    with ServerThread(create_app(lm, model_id="tiny-served")) as srv:
        api_results, api_samples = _evaluate(
            "local-completions", _api_args(srv, model_dir, batch_size=batch_size), task_dir
        )
    hf_results, hf_samples = _evaluate("hf", _hf_args(model_dir), task_dir)

    assert len(api_samples) == len(hf_samples) == len(QUESTIONS)
    saw_greedy = False
    for api, hf, doc_choices in zip(api_samples, hf_samples, choices, strict=True):
        assert api["doc_id"] == hf["doc_id"]
        ours, theirs = _loglikelihoods(api), _loglikelihoods(hf)
        assert len(ours) == len(theirs) == len(doc_choices)
        for choice, (ll, greedy), (ref_ll, ref_greedy) in zip(
            doc_choices, ours, theirs, strict=True
        ):
            assert ll < 0
            assert abs(ll - ref_ll) < 1e-3, (api["doc_id"], choice, ll, ref_ll)
            assert greedy == ref_greedy, (api["doc_id"], choice)
            saw_greedy |= ref_greedy
        assert api["acc"] == hf["acc"] and api["acc_norm"] == hf["acc_norm"], api["doc_id"]
    assert saw_greedy, "the model's own greedy continuation should score is_greedy=True"

    for metric in ("acc,none", "acc_norm,none"):
        assert api_results[metric] == hf_results[metric], metric


EOS_TASK = "chatforge_tiny_eos_mc"
# Answers of one token each (space included) in the tiny vocabulary, as in tasks whose
# choices are " A"/" B"/...: a model that ends its reply right after one of them
# generates EOS as the one token lm-eval's loglikelihood request asks for.
EOS_QUESTIONS = [
    ("Which country has Paris as its capital?", [" France", " dragon", " music", " day"], 0),
    ("Do you like music?", [" Yes", " I", " It"], 0),
    ("What breathes fire?", [" music", " dragon", " France"], 1),
    ("What comes after the night?", [" again", " day", " nice"], 1),
    ("What do we listen to?", [" the", " music", " capital"], 1),
    ("What is Paris to France?", [" dragon", " live", " capital"], 2),
    ("What do you say for a gift?", [" thank", " was", " upon"], 0),
]


def _eos_prone_model(src: Path, dst: Path) -> tuple[Path, list[list[bool]]]:
    """A copy of the tiny Llama that often ends its reply after an answer, as an instruct
    model does: its lm_head row of EOS is scaled so that EOS is the greedy token after about
    half of the (question, answer) pairs. Returns it and, per pair, whether EOS follows.

    Scaling that row scales the EOS logit alone, so the scale is chosen from one forward
    pass: halfway (in log) between two pairs' thresholds, well away from either."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    eos = tok.eos_token_id
    thresholds = []  # per pair: the scale above which EOS is the greedy next token
    for q, choices, _ in EOS_QUESTIONS:
        ctx = PROMPT.format(q=q)
        for c in choices:
            ids = tok.encode(ctx + c)
            assert (
                ids[: len(tok.encode(ctx))] == tok.encode(ctx)
                and len(ids) == len(tok.encode(ctx)) + 1
            ), (q, c)  # one token, whatever lm-eval does with the context
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]  # (V,)
            best_other = float(torch.cat([logits[:eos], logits[eos + 1 :]]).max())
            lo = float(logits[eos])
            thresholds.append(best_other / lo if lo > 0 else float("inf"))
    ordered = sorted(thresholds)
    k = len(ordered) // 2
    assert ordered[k] < float("inf") and ordered[k] / ordered[k - 1] > 1.01, ordered
    scale = (ordered[k - 1] * ordered[k]) ** 0.5
    with torch.no_grad():
        model.lm_head.weight[eos] *= scale
    shutil.copytree(src, dst)
    model.save_pretrained(dst)
    ends, i = [], 0
    for _, choices, _ in EOS_QUESTIONS:
        ends.append([t < scale for t in thresholds[i : i + len(choices)]])
        i += len(choices)
    return dst, ends


def test_local_completions_scores_answers_the_model_ends_after(tiny_llama_dir, tmp_path, offline):
    """When the token lm-eval's echo + max_tokens=1 request generates is EOS, it is still
    reported (lm-eval drops the last logprobs entry, taking it for the generated one): the
    loglikelihoods and accuracy through the server equal lm-eval's hf backend on the same
    fp32 weights. (Without it, the answer's own token was dropped: loglikelihood 0.)"""
    model_dir, ends = _eos_prone_model(tiny_llama_dir, tmp_path / "eos-prone")
    flat = [e for row in ends for e in row]
    assert sum(flat) >= len(flat) // 2 and not all(flat), ends
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    data = task_dir / "eos.jsonl"
    rows = [{"question": q, "choices": c, "label": label} for q, c, label in EOS_QUESTIONS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (task_dir / f"{EOS_TASK}.yaml").write_text(
        TASK_YAML.format(task=EOS_TASK, data=data, cache=tmp_path / "hf-datasets-cache"),
        encoding="utf-8",
    )
    lm = load_model(str(model_dir), dtype="fp32", quantize="none")
    assert lm.info.quantize == "none" and lm.info.dtype == "fp32", lm.info
    with ServerThread(create_app(lm, model_id="tiny-served")) as srv:
        api_results, api_samples = _evaluate(
            "local-completions", _api_args(srv, model_dir, batch_size=4), task_dir, EOS_TASK
        )
    hf_results, hf_samples = _evaluate("hf", _hf_args(model_dir), task_dir, EOS_TASK)

    assert len(api_samples) == len(hf_samples) == len(EOS_QUESTIONS)
    deltas, greedy = [], []
    for api, hf in zip(api_samples, hf_samples, strict=True):
        assert api["doc_id"] == hf["doc_id"]
        ours, theirs = _loglikelihoods(api), _loglikelihoods(hf)
        assert len(ours) == len(theirs) == len(EOS_QUESTIONS[api["doc_id"]][1])
        for (ll, g), (ref_ll, ref_g) in zip(ours, theirs, strict=True):
            deltas.append(abs(ll - ref_ll))
            greedy.append((g, ref_g))
    assert max(deltas) < 2e-3, (max(deltas), deltas)
    assert all(g == ref_g for g, ref_g in greedy), greedy
    for api, hf in zip(api_samples, hf_samples, strict=True):
        assert api["acc"] == hf["acc"] and api["acc_norm"] == hf["acc_norm"], api["doc_id"]
    for metric in ("acc,none", "acc_norm,none"):
        assert api_results[metric] == hf_results[metric], metric


GEN_TASK = "chatforge_tiny_gen"
# lm-eval adds the tokenizer's eos text to ``until``; OpenAI takes at most 4 stops (we 16)
GEN_YAML = (
    DATA_YAML
    + """\
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n\\n", "ell", "99"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""
)


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_local_completions_greedy_generation_matches_hf_backend(
    request, tmp_path, offline, model_fixture
):
    """generate_until: greedy text, stop strings ("ell"/"99" stop these tiny models early)."""
    model_dir = request.getfixturevalue(model_fixture)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    data = task_dir / "gen.jsonl"
    rows = [{"question": q, "answer": choices[label]} for q, choices, label in QUESTIONS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (task_dir / f"{GEN_TASK}.yaml").write_text(
        GEN_YAML.format(task=GEN_TASK, data=data, cache=tmp_path / "hf-datasets-cache"),
        encoding="utf-8",
    )
    lm = load_model(str(model_dir), dtype="fp32", quantize="none")
    with ServerThread(create_app(lm, model_id="tiny-served")) as srv:
        _, api_samples = _evaluate(
            "local-completions", _api_args(srv, model_dir), task_dir, GEN_TASK
        )
    _, hf_samples = _evaluate("hf", _hf_args(model_dir), task_dir, GEN_TASK)
    assert len(api_samples) == len(hf_samples) == len(QUESTIONS)
    for api, hf in zip(api_samples, hf_samples, strict=True):
        assert api["doc_id"] == hf["doc_id"]
        # lm-eval's hf backend decodes every generated token, so a reply the budget cut
        # inside a character ends in U+FFFD there; the server ends before that character.
        assert _unbroken(api["resps"]) == _unbroken(hf["resps"]), api["doc_id"]
        assert _unbroken(api["filtered_resps"]) == _unbroken(hf["filtered_resps"])
        assert isinstance(api["resps"][0][0], str)


def _unbroken(value):
    """``value`` with every string's trailing U+FFFD removed (nested lists kept)."""
    if isinstance(value, str):
        return value.rstrip("\ufffd")
    if isinstance(value, list):
        return [_unbroken(v) for v in value]
    return value
