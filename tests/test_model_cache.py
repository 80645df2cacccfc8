"""The GGUF conversion cache (keyed by content), `models list` and `models rm`.

Small fake GGUF files are written with the ``gguf`` package; the conversion itself
(transformers, seconds) is replaced by a fake that writes a minimal model
directory, so these tests check the cache's book-keeping, not transformers.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chatforge.models import gguf as cache
from chatforge.models import gguf_file, registry
from chatforge.models.loading import resolve
from chatforge.models.meta import ModelMeta
from cli_helpers import run


def write_gguf(path: Path, name: str = "fake", values: int = 64, seed: int = 0) -> Path:
    """A valid little GGUF file: a name, a context length and one float tensor."""
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(64)
    w.add_tensor("weight", np.random.default_rng(seed).random(values, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _fake_model_dir(out: Path, meta: ModelMeta) -> None:
    """config.json + a 4-parameter safetensors file + chatforge.json."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    blob = struct.pack("<Q", len(header)) + header.encode() + bytes(16)
    (out / "model.safetensors").write_bytes(blob)
    meta.write(out)


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """Private cache and data dirs, a fake bundled alias, and a counting fake converter."""
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CHATFORGE_DATA", str(tmp_path / "data"))
    pkg = tmp_path / "site" / "fakebundle"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    bundled = write_gguf(pkg / "Fake-1M.gguf", "Fake-1M")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias = registry.Alias("fakebundle", "Fake-1M.gguf", "pip install x", "fake-1m", "Fake")
    for name in list(registry.ALIASES):  # only the fake one: the listing is predictable
        monkeypatch.delitem(registry.ALIASES, name)
    monkeypatch.setitem(registry.ALIASES, "fake", alias)
    calls: list[Path] = []

    def fake_convert(path: Path, out: Path, display: str, extra: dict | None = None) -> None:
        calls.append(path)
        meta = ModelMeta("chat_template", display, str(path), True, extra or {})
        _fake_model_dir(out, meta)

    monkeypatch.setattr(cache, "_convert_into", fake_convert)

    class Env:
        root = tmp_path
        models = tmp_path / "cache" / "models"
        gguf_file = bundled
        conversions = calls

    return Env


def _entries(env) -> list[Path]:
    return sorted(p for p in env.models.iterdir()) if env.models.exists() else []


def test_alias_path_and_copy_share_one_conversion(env, tmp_path):
    first, converted, _ = resolve("fake")
    assert converted and len(env.conversions) == 1
    again, converted, _ = resolve(str(env.gguf_file))
    assert again == first and not converted
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(env.gguf_file.read_bytes())
    assert resolve(str(copy))[0] == first
    assert len(env.conversions) == 1 and _entries(env) == [first]
    meta = ModelMeta.read(first)
    assert meta.extra["sha256"] == gguf_file.sha256_file(env.gguf_file)


def test_different_content_gets_its_own_conversion(env, tmp_path):
    a = write_gguf(tmp_path / "m.gguf", seed=1)
    da = resolve(str(a))[0]
    write_gguf(a, seed=2)  # same path, new bytes
    db = resolve(str(a))[0]
    assert da != db and len(env.conversions) == 2


def test_digest_is_remembered_until_the_file_changes(env, tmp_path, monkeypatch):
    f = write_gguf(tmp_path / "m.gguf")
    digest = gguf_file.file_digest(f)
    monkeypatch.setattr(gguf_file, "sha256_file", lambda p: pytest.fail("hashed again"))
    assert gguf_file.file_digest(f) == digest
    monkeypatch.undo()
    monkeypatch.setenv("CHATFORGE_CACHE", str(env.root / "cache"))
    write_gguf(f, seed=5)
    assert gguf_file.file_digest(f) != digest


def test_old_path_keyed_conversion_is_reused(env, tmp_path):
    f = write_gguf(tmp_path / "old.gguf")
    legacy = env.models / cache.legacy_cache_key(f)
    _fake_model_dir(legacy, ModelMeta("chat_template", "old", str(f), True))
    directory, converted, _ = resolve(str(f))
    assert directory == legacy and not converted and not env.conversions
    assert ModelMeta.read(legacy).extra["sha256"] == gguf_file.sha256_file(f)


def test_old_alias_dir_is_reused_only_when_it_came_from_this_file(env):
    legacy = env.models / "fake-1m"
    _fake_model_dir(legacy, ModelMeta("chat_template", "Fake", "/some/other/file.gguf", True))
    directory, converted, _ = resolve("fake")
    assert directory != legacy and converted  # not provably this file: converted anew
    assert legacy.exists()  # left for `models rm`, not deleted behind the user's back


def test_old_alias_dir_from_this_file_is_adopted(env):
    legacy = env.models / "fake-1m"
    _fake_model_dir(legacy, ModelMeta("chat_template", "Fake", str(env.gguf_file), True))
    assert resolve("fake")[0] == legacy and not env.conversions
    assert resolve(str(env.gguf_file))[0] == legacy


def test_interrupted_conversion_leaves_no_temp_dir(env, monkeypatch, tmp_path):
    def interrupted(path, out, display, extra=None):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_convert_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve(str(env.gguf_file))
    assert [p.name for p in env.models.iterdir()] == []


def _temp(env, pid: int, age: float = 0.0) -> Path:
    d = env.models / f".tmp-Fake-1M-abc-{pid}-{time.monotonic_ns()}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if age:
        then = time.time() - age
        for p in (d / "model.safetensors", d):
            os.utime(p, (then, then))
    return d


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_dirs_are_cleaned_live_ones_kept(env):
    dead = _temp(env, _dead_pid())
    live = _temp(env, os.getppid())
    abandoned = _temp(env, os.getppid(), age=2 * cache.STALE_SECONDS)
    resolve(str(env.gguf_file))  # a conversion cleans up first
    assert not dead.exists() and not abandoned.exists()
    assert live.exists()
    dead2 = _temp(env, _dead_pid())
    registry.list_local_models(hub=False)  # and so does listing
    assert not dead2.exists() and live.exists()


def test_models_list_piped(env, capsys, tmp_path):
    resolve("fake")
    other = write_gguf(tmp_path / "a-rather-long-directory-name" / "Other-Model.gguf", seed=3)
    resolve(str(other))
    trained = tmp_path / "runs" / "my-chat-model"
    _fake_model_dir(trained, ModelMeta("sep", "my-chat-model", "gpt2 from scratch", True))
    registry.remember_trained_model(trained)
    gone = tmp_path / "runs" / "deleted"
    _fake_model_dir(gone, ModelMeta("sep", "deleted", "x", True))
    registry.remember_trained_model(gone)
    import shutil

    shutil.rmtree(gone)
    code, out, _ = run(["models", "list"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["model", "(--model)", "kind"]
    assert "size" in lines[0] and "from" in lines[0]
    assert "\x1b[" not in out and "…" not in out and "│" not in out  # plain text, whole values
    by_kind = {}
    for line in lines[1:]:
        by_kind.setdefault(line.split()[1], []).append(line)
    assert by_kind["bundled"][0].startswith("fake ")
    converted = by_kind["converted"]
    assert len(converted) == 2
    assert any(line.startswith("fake ") and "fake (bundled GGUF)" in line for line in converted)
    assert any(str(other) in line for line in converted)
    assert len(by_kind["trained"]) == 1 and str(trained) in by_kind["trained"][0]
    assert "gpt2 from scratch" in by_kind["trained"][0]
    assert all(" KB" in line or " B " in line for line in lines[1:])
    assert "deleted" not in out


def _digest_dirs(env) -> list[Path]:
    return [d for d in _entries(env) if not d.name.startswith(".")]


def test_rm_by_hash_prefix_with_yes(env, capsys):
    d = resolve("fake")[0]
    prefix = ModelMeta.read(d).extra["sha256"][:8]
    code, _, err = run(["models", "rm", prefix, "--yes"], capsys)
    assert code == 0, err
    assert not d.exists() and _digest_dirs(env) == []
    assert env.gguf_file.exists()


def test_rm_alias_asks_and_never_touches_the_bundled_file(env, capsys):
    d = resolve("fake")[0]
    code, _, err = run(["models", "rm", "fake"], capsys, "n\n")
    assert code == 2 and "nothing removed" in err and d.exists()
    code, _, err = run(["models", "rm", "fake"], capsys, "")  # no answer = no
    assert code == 2 and "--yes" in err and d.exists()
    code, _, err = run(["models", "rm", "fake"], capsys, "y\n")
    assert code == 0 and "Removed" in err and not d.exists()
    assert env.gguf_file.exists()
    code, _, err = run(["models", "rm", "fake", "-y"], capsys)
    assert code == 2 and "no converted copy" in err and "never deleted" in err


def test_rm_by_gguf_path_and_by_dir_name(env, capsys, tmp_path):
    f = write_gguf(tmp_path / "x.gguf", seed=7)
    d = resolve(str(f))[0]
    assert run(["models", "rm", str(f), "-y"], capsys)[0] == 0
    assert not d.exists() and f.exists()
    d = resolve(str(f))[0]
    assert run(["models", "rm", d.name, "-y"], capsys)[0] == 0 and not d.exists()


def test_rm_unknown_and_foreign_things_are_clear_errors(env, capsys, tmp_path):
    code, _, err = run(["models", "rm", "no-such-model", "-y"], capsys)
    assert code == 2 and "no model 'no-such-model' to remove" in err
    assert len(err.strip().splitlines()) == 1
    mine = tmp_path / "my-own-dir"
    mine.mkdir()
    code, _, err = run(["models", "rm", str(mine), "-y"], capsys)
    assert code == 2 and "only removes what it made" in err and mine.exists()
    stray = write_gguf(tmp_path / "never-converted.gguf")
    code, _, err = run(["models", "rm", str(stray), "-y"], capsys)
    assert code == 2 and "no converted copy" in err and stray.exists()


def test_rm_trained_forgets_and_deletes_only_when_asked(env, capsys, tmp_path):
    out = tmp_path / "runs" / "mine"
    _fake_model_dir(out, ModelMeta("sep", "mine", "gpt2", True))
    registry.remember_trained_model(out)
    registry.remember_trained_model(out)  # twice: one entry
    assert registry.trained_models() == [out.resolve()]
    code, _, err = run(["models", "rm", str(out), "-y"], capsys)
    assert code == 0 and "Forgot" in err
    assert out.exists() and registry.trained_models() == []
    registry.remember_trained_model(out)
    code, _, err = run(["models", "rm", "mine", "--delete-files"], capsys, "y\n")
    assert code == 0 and not out.exists() and registry.trained_models() == []


def test_hub_cache_rows_are_optional(env):
    rows = registry.list_local_models(hub=False)
    assert [r.kind for r in rows] == ["bundled"]
    assert rows[0].status == "converted on first use"
    assert rows[0].size_bytes == env.gguf_file.stat().st_size
