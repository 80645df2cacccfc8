"""Named models (`chatforge models create/show/list/rm`, `chat NAME`, `generate --model
NAME`) on the tiny random models, through the real entry point."""

from __future__ import annotations

import json

import pytest

from chatforge import GenerationConfig
from chatforge.models.recipes import (
    Recipe,
    create_recipe,
    get_recipe,
    list_recipes,
    load_recipe_model,
    remove_recipe,
    resolve_named,
)
from chatforge.store import ConversationLog
from cli_helpers import run
from training_helpers import write_convmodel


@pytest.fixture(autouse=True)
def _data(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    """A LoRA adapter written by `chatforge train --lora` (2 steps on the tiny Llama)."""
    out = tmp_path_factory.mktemp("lora") / "adapter"
    data = write_convmodel(out.parent / "d.jsonl", n=8)
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--lora"]
    argv += ["--lora-r", "4", "--max-steps", "2", "--batch-size", "2", "--lr", "0.05"]
    argv += ["--precision", "fp32", "-q", "-o", str(out)]
    from chatforge.cli.app import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATFORGE_DATA", str(out.parent / "data"))
        assert main(argv) == 0
    assert (out / "adapter_config.json").exists()
    return out


def test_create_show_list_rm(tiny_llama_dir, tiny_gpt2_dir, capsys, tmp_path):
    sysfile = tmp_path / "sys.txt"
    sysfile.write_text("You are a pirate.\n")
    argv = ["models", "create", "Pirate:v1", "--from", str(tiny_llama_dir)]
    argv += ["--system-file", str(sysfile), "--preset", "creative"]
    argv += ["--set", "temperature=0.3", "--set", "stop=User:|Bot:", "--set", "max-new-tokens=9"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    recipe = get_recipe("pirate:V1")  # names are case-insensitive
    assert recipe is not None and recipe.name == "Pirate:v1"
    assert recipe.base == str(tiny_llama_dir.resolve()) and recipe.system == "You are a pirate."
    assert recipe.params == {"temperature": 0.3, "stop": ["User:", "Bot:"], "max_new_tokens": 9}
    cfg = recipe.generation_config()
    assert (cfg.temperature, cfg.top_p, cfg.min_p) == (0.3, 0.95, 0.05)  # creative + params
    assert cfg.stop == ("User:", "Bot:") and cfg.max_new_tokens == 9
    # Over a server's neutral defaults: only the preset's and the recipe's values change.
    served = recipe.generation_config(GenerationConfig(max_new_tokens=100, seed=3))
    assert served.seed == 3 and served.max_new_tokens == 9 and served.top_p == 0.95

    code, out, err = run(["models", "show", "pirate:v1"], capsys)
    assert code == 0, err
    assert "system   You are a pirate." in out and "preset   creative" in out
    assert "  temperature = 0.3" in out and "  min_p = 0.05" in out
    assert "  max_new_tokens = 9" in out

    create_recipe("plain", str(tiny_gpt2_dir))
    code, out, _ = run(["models", "list"], capsys)
    named = [line.split() for line in out.splitlines() if " named " in line]
    assert [(c[0], c[1]) for c in named] == [("Pirate:v1", "named"), ("plain", "named")]
    assert str(tiny_gpt2_dir.resolve()) in out
    assert [r.name for r in list_recipes()] == ["Pirate:v1", "plain"]

    code, _, err = run(["models", "rm", "plain"], capsys, "n\n")  # asks; no = nothing removed
    assert code == 2 and "not confirmed" in err and get_recipe("plain") is not None
    code, _, err = run(["models", "rm", "plain", "--delete-files", "-y"], capsys)
    assert code == 2 and "--delete-files applies to trained models" in err
    code, _, err = run(["models", "rm", "plain"], capsys, "y\n")
    assert code == 0 and "Removed the named model plain" in err
    assert get_recipe("plain") is None and tiny_gpt2_dir.is_dir()  # the base stays
    assert run(["models", "rm", "Pirate:v1", "--yes"], capsys)[0] == 0
    assert list_recipes() == [] and not remove_recipe("Pirate:v1")
    code, _, err = run(["models", "show", "pirate:v1"], capsys)
    assert code == 2 and "no named model" in err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--from", "{llama}", "--set", "top_p=7"], "--set top_p must be in (0, 1]"),
        (["--from", "{llama}", "--set", "top_p"], "--set takes NAME=VALUE"),
        (["--from", "{llama}", "--set", "bogus=1"], "unknown generation parameter 'bogus'"),
        (["--from", "{llama}", "--preset", "wild"], "--preset must be one of precise"),
        (["--from", "{tmp}/nope"], "not found: no such directory or file"),
        (["--from", "{tmp}/nope.gguf"], "does not exist"),
        (["--from", "{llama}", "--adapter", "{llama}"], "holds no adapter_config.json"),
        (["--from", "{llama}", "--adapter", "{tmp}/none"], "does not exist"),
        (["--from", "{llama}", "--system", "a", "--system-file", "x"], "give the system prompt"),
    ],
)
def test_create_validation_errors(flags, needle, tiny_llama_dir, tmp_path, capsys):
    flags = [f.format(llama=tiny_llama_dir, tmp=tmp_path) for f in flags]
    code, _, err = run(["models", "create", "bot", *flags], capsys)
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert get_recipe("bot") is None


def test_names_and_force(tiny_llama_dir, tiny_gpt2_dir, capsys):
    for bad, needle in [("a/b", "not a simple name"), ("smollm2", "bundled model's name")]:
        code, _, err = run(["models", "create", bad, "--from", str(tiny_llama_dir)], capsys)
        assert code == 2 and needle in err
    assert run(["models", "create", "bot", "--from", str(tiny_llama_dir)], capsys)[0] == 0
    code, _, err = run(["models", "create", "bot", "--from", str(tiny_gpt2_dir)], capsys)
    assert code == 2 and "already exists; pass --force" in err
    assert get_recipe("bot").base == str(tiny_llama_dir.resolve())
    argv = ["models", "create", "bot", "--from", str(tiny_gpt2_dir), "--force"]
    assert run(argv, capsys)[0] == 0
    assert get_recipe("bot").base == str(tiny_gpt2_dir.resolve())
    code, _, err = run(["models", "create", "bot2", "--from", "bot"], capsys)
    assert code == 2 and "is a named model" in err
    assert resolve_named("smollm2") is None and resolve_named("./bot") is None
    assert isinstance(resolve_named("BOT"), Recipe)


def _chat(argv, capsys, stdin="Hello there\n"):
    code, out, err = run(["chat", *argv], capsys, stdin)
    assert code == 0, err
    return out


def test_chat_name_uses_the_recipe_and_flags_override(tiny_llama_dir, capsys):
    system = "You are a terse pirate."
    argv = ["models", "create", "pirate", "--from", str(tiny_llama_dir), "--system", system]
    argv += ["--set", "temperature=0", "--set", "max_new_tokens=6"]
    assert run(argv, capsys)[0] == 0
    by_name = _chat(["pirate"], capsys)
    explicit = ["--model", str(tiny_llama_dir), "-t", "0", "--max-new-tokens", "6", "--no-log"]
    assert by_name == _chat([*explicit, "--system", system], capsys)
    _chat(explicit[:-1], capsys)  # logged too: the same prompt without a system prompt
    log = ConversationLog()
    named, bare = sorted((log.get(c.id) for c in log.list()), key=lambda c: c.id)
    assert named.model == "pirate" and named.system == system and bare.system is None
    (reply,) = [m for m in named.messages if m.role == "assistant"]
    (bare_reply,) = [m for m in bare.messages if m.role == "assistant"]
    assert reply.completion_tokens == 6  # the recipe's max_new_tokens
    # The model saw the system prompt: its prompt is the bare one plus those tokens.
    assert reply.prompt_tokens > bare_reply.prompt_tokens + 4

    # Flags the user gives win; those not given leave the recipe's values alone.
    out = _chat(["--model", "pirate", "--max-new-tokens", "2", "--no-log"], capsys)
    assert out == _chat([*explicit[:-3], "--max-new-tokens", "2", "--system", system], capsys)
    no_system = _chat(["pirate", "--system", "", "--no-log"], capsys)
    assert no_system == _chat(explicit, capsys)
    code, _, err = run(["chat", "pirate", "--model", str(tiny_llama_dir)], capsys, "hi\n")
    assert code == 2 and "give the model once" in err


def test_generate_model_name(tiny_llama_dir, tmp_path, capsys):
    create_recipe(
        "bot",
        str(tiny_llama_dir),
        system="Answer in French.",
        params={"temperature": 0, "max_new_tokens": 4},
    )
    inp = tmp_path / "in.txt"
    inp.write_text("Hello\nHow are you\n")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    code, _, err = run(
        ["generate", str(inp), "-o", str(a), "--model", "bot", "--no-progress"], capsys
    )
    assert code == 0, err
    argv = ["generate", str(inp), "-o", str(b), "--model", str(tiny_llama_dir), "--no-progress"]
    argv += ["--system", "Answer in French.", "-t", "0", "--max-new-tokens", "4"]
    assert run(argv, capsys)[0] == 0
    ra = [json.loads(line) for line in a.read_text().splitlines()]
    rb = [json.loads(line) for line in b.read_text().splitlines()]
    assert [r["output"] for r in ra] == [r["output"] for r in rb]
    assert [r["prompt_tokens"] for r in ra] == [r["prompt_tokens"] for r in rb]
    assert ra[0]["model"]["name"] == "bot" and ra[0]["params"]["max_new_tokens"] == 4
    c = tmp_path / "c.jsonl"
    argv = ["generate", str(inp), "-o", str(c), "--model", "bot", "--no-progress"]
    assert run([*argv, "--max-new-tokens", "2"], capsys)[0] == 0
    assert all(json.loads(line)["completion_tokens"] == 2 for line in c.read_text().splitlines())


def test_adapter_recipe_matches_the_adapter_directory(
    adapter_dir, tiny_llama_dir, tmp_path, capsys
):
    import shutil

    import torch

    from chatforge import ChatSession, load_model

    greedy = GenerationConfig(temperature=0, max_new_tokens=8)
    direct = ChatSession(load_model(str(adapter_dir)), greedy).send("hello there").text

    recipe = create_recipe("tuned", str(tiny_llama_dir), adapter=str(adapter_dir))
    loaded = load_recipe_model(recipe)
    assert loaded.info.name == "tuned" and loaded.info.ref == "tuned"
    assert ChatSession(loaded, greedy).send("hello there").text == direct
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # the adapter is merged: not the base's numbers
        tuned = loaded.model(ids).logits
        assert not torch.allclose(tuned, load_model(str(tiny_llama_dir)).model(ids).logits)

    # A base at another path than the one the adapter records: loaded and merged there.
    moved = shutil.copytree(tiny_llama_dir, tmp_path / "moved-base")
    recipe = create_recipe("moved", str(moved), adapter=str(adapter_dir))
    other = load_recipe_model(recipe)
    assert other.info.path == adapter_dir and other.info.adapter_base == str(moved.resolve())
    assert ChatSession(other, greedy).send("hello there").text == direct
    other.release_transformers()
    with torch.no_grad():  # transformers' copy, loaded again, is still base + adapter
        torch.testing.assert_close(other.model(ids).logits, tuned, atol=1e-5, rtol=1e-4)

    argv = ["chat", "tuned", "-t", "0", "--max-new-tokens", "8", "--no-log"]
    code, out, err = run(argv, capsys, "hello there\n")
    assert code == 0, err
    assert out == direct + "\n"


def test_adapter_on_another_kind_of_model_is_refused(adapter_dir, tiny_gpt2_dir, capsys):
    argv = ["models", "create", "x", "--from", str(tiny_gpt2_dir), "--adapter", str(adapter_dir)]
    code, _, err = run(argv, capsys)
    assert code == 2 and "trained on another kind of model" in err
