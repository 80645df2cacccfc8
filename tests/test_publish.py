"""A finished LoRA training output into a running server: ``publish_adapter`` (``train
--serve-to URL --as NAME``) and ``serve --watch DIR``, the previous version kept as
``NAME:vK``; and their one-line errors."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import httpx
import pytest

from chatforge import load_model
from chatforge.cli.serve import watched_dirs
from chatforge.errors import ParamError
from chatforge.models.meta import ModelMeta
from chatforge.publish import (
    PublishError,
    check_publish_target,
    finished_lora,
    output_state,
    publish_adapter,
    publish_after_training,
    version_name,
)
from chatforge.server import ServedModel, create_app
from lora_helpers import make_adapter
from serverkit import ServerThread, free_port, wait_until

KEY = "s3cret"


def finished(adapter: Path, out: Path, base: Path) -> Path:
    """``adapter``'s files as ``chatforge train --lora`` leaves them in ``out``."""
    shutil.copytree(adapter, out, dirs_exist_ok=True)
    return mark_finished(out, base)


def mark_finished(out: Path, base: Path) -> Path:
    """The ``chatforge.json`` training writes last, when the run has finished."""
    ModelMeta(
        prompt_format="chat_template",
        name=out.name,
        source=str(base),
        complete=True,
        extra={"base_model": str(base), "training": {}, "train_config": {}},
    ).write(out)
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """Two LoRA adapters of the tiny Llama (not yet training outputs)."""
    root = tmp_path_factory.mktemp("publish-adapters")
    return make_adapter(tiny_llama_dir, root / "a", 1), make_adapter(tiny_llama_dir, root / "b", 2)


class Log(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def server(tiny_llama_dir, runs, tmp_path_factory):
    """One server (with an API key) serving the tiny Llama, the two adapters as
    themselves (``ref-a``, ``ref-b``: the answers to compare with), and watching two
    directories that do not exist yet."""
    root = tmp_path_factory.mktemp("watched")
    watch = root / "bot-w"
    full = root / "full"
    app = create_app(
        models=[
            ServedModel(
                "base", lambda: load_model(str(tiny_llama_dir), dtype="fp32", quantize="none")
            )
        ],
        api_key=KEY,
        watch=[("bot-w", watch), ("full-w", full)],
        watch_interval=0.1,
    )
    srv = ServerThread(app)  # (uvicorn's logging set up: a handler added now stays)
    log = Log()
    logging.getLogger("uvicorn.error").addHandler(log)
    with srv:
        assert wait_until(lambda: srv.state.started, 60)
        for name, path in zip(("ref-a", "ref-b"), runs, strict=True):
            r = _client().post(srv.url + "/v1/adapters", json={"name": name, "path": str(path)})
            assert r.status_code == 200, r.text
        srv.watch, srv.full, srv.log = watch, full, log
        yield srv
    logging.getLogger("uvicorn.error").removeHandler(log)


def _client() -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def _answer(url: str, model: str) -> str:
    body = {"model": model, "prompt": "Hello there", "temperature": 0, "max_tokens": 8}
    r = _client().post(url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _adapters(url: str) -> dict[str, str]:
    data = _client().get(url + "/v1/adapters").json()["data"]
    return {a["name"]: a["path"] for a in data}


def test_publish_keeps_the_previous_version(server, runs, tiny_llama_dir, tmp_path):
    a, b = runs
    want_a, want_b = _answer(server.url, "ref-a"), _answer(server.url, "ref-b")
    assert want_a != want_b
    out = finished(a, tmp_path / "bot-lora", tiny_llama_dir)

    line = publish_after_training(out, server.url, "bot", KEY)
    assert line == f"serving {out} as 'bot'"
    ids = [c["id"] for c in _client().get(server.url + "/v1/models").json()["data"]]
    assert "bot" in ids and "bot:v1" not in ids
    assert _answer(server.url, "bot") == want_a

    # the next run overwrites the same output directory (train --overwrite)
    shutil.rmtree(out)
    finished(b, out, tiny_llama_dir)
    result = publish_adapter(server.url + "/v1", "bot", out, api_key=KEY)
    assert (result.name, result.kept_as) == ("bot", "bot:v1")
    assert "the previous version is now 'bot:v1'" in result.describe()
    assert _answer(server.url, "bot") == want_b
    assert _answer(server.url, "bot:v1") == want_a  # from its snapshot: out holds b now
    served = _adapters(server.url)
    assert Path(served["bot"]) == result.path and not result.path.is_relative_to(out)

    # the same adapter again: nothing to keep
    again = publish_adapter(server.url, "bot", out, api_key=KEY)
    assert again.kept_as is None and "same adapter" in again.describe()
    # a third version: v2, while v1 stays
    out2 = finished(a, tmp_path / "other", tiny_llama_dir)
    assert publish_adapter(server.url, "bot", out2, api_key=KEY).kept_as == "bot:v2"
    assert _answer(server.url, "bot") == want_a and _answer(server.url, "bot:v2") == want_b

    # a replacement the server refuses leaves everything as it was (no bot:v3)
    out3 = finished(b, tmp_path / "third", tiny_llama_dir)
    before = _adapters(server.url)
    with pytest.raises(PublishError, match="answered 404: the model 'nope' does not exist"):
        publish_adapter(server.url, "bot", out3, base="nope", api_key=KEY)
    assert _adapters(server.url) == before
    # served straight from the output directory: its files are the new ones, nothing to keep
    r = _client().post(server.url + "/v1/adapters", json={"name": "direct", "path": str(out3)})
    assert r.status_code == 200, r.text
    direct = publish_adapter(server.url, "direct", out3, api_key=KEY)
    assert direct.kept_as is None and "which holds this one now: not kept" in direct.describe()
    for name in ("bot", "bot:v1", "bot:v2", "direct"):
        assert _client().delete(f"{server.url}/v1/adapters/{name}").status_code == 200


def test_publish_errors_are_one_line(server, runs, tiny_llama_dir, tmp_path):
    a, _ = runs
    out = finished(a, tmp_path / "out", tiny_llama_dir)

    def fails(match: str, *args, **kw) -> str:
        with pytest.raises(PublishError, match=match) as e:
            publish_adapter(*args, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    fails("the server wants an API key: pass it with --api-key", server.url, "x", out)
    fails("refused the API key: check --api-key", server.url, "x", out, api_key="wrong")
    port = free_port()
    fails(
        rf"no chatforge server at http://127.0.0.1:{port}: .*; start one with `chatforge serve`",
        f"http://127.0.0.1:{port}",
        "x",
        out,
    )
    fails("--as: 'bad name' is not a valid model name", server.url, "bad name", out)
    fails("answered 409: 'base' already names a model", server.url, "base", out, api_key=KEY)

    running = tmp_path / "running"
    running.mkdir()
    (running / "adapter_config.json").write_text("{}")
    fails(r"running has no finished model yet \(no chatforge.json\)", server.url, "x", running)
    ModelMeta(complete=False).write(running)
    fails("no finished model yet .its chatforge.json says", server.url, "x", running)
    assert output_state(running) == "unfinished"
    full = shutil.copytree(tiny_llama_dir, tmp_path / "full")
    ModelMeta(prompt_format="chat_template").write(full)
    fails(
        f"{full} is a full model, not a LoRA adapter: serve it with `chatforge serve -m {full}`",
        server.url,
        "x",
        full,
    )
    fails("does not exist", server.url, "x", tmp_path / "nothing")
    assert "x" not in _adapters(server.url)

    # after training: the model is saved, and the command to load it later
    with pytest.raises(PublishError) as e:
        publish_after_training(out, server.url, "x")
    msg = str(e.value)
    assert msg.startswith(f"the trained model is saved in {out}, but it was not loaded into")
    assert msg.endswith(f"chatforge publish {out} --serve-to {server.url} --as x")


def test_checks_before_training(server, tmp_path):
    out = tmp_path / "my-run"
    assert check_publish_target(None, None, out) is None
    with pytest.raises(PublishError, match="--as names the model in a running server"):
        check_publish_target(None, "bot", out)
    assert check_publish_target(server.url, None, out, KEY) == "my-run"  # the folder's name
    with pytest.raises(PublishError, match="give one with --as NAME"):
        check_publish_target(server.url, None, tmp_path / "my run", KEY)
    with pytest.raises(PublishError, match="no chatforge server"):
        check_publish_target(f"http://127.0.0.1:{free_port()}", "bot", out)
    with pytest.raises(PublishError, match="not a server address"):
        check_publish_target("localhost:8000", "bot", out)


def test_version_names_and_watch_flags(tmp_path):
    assert version_name("bot", ["bot", "other:v7"]) == "bot:v1"
    assert version_name("bot", ["bot", "bot:v1", "bot:v3", "bot:vx"]) == "bot:v4"
    with pytest.raises(PublishError, match="does not exist"):
        finished_lora(tmp_path / "nope")
    spec = type("Spec", (), {"name": "base"})()
    assert watched_dirs([str(tmp_path / "runs" / "dreams")], [spec]) == [
        ("dreams", tmp_path / "runs" / "dreams")
    ]
    assert watched_dirs([f"bot={tmp_path}/a=b"], [spec]) == [("bot", tmp_path / "a=b")]
    for bad, match in [
        (f"{tmp_path}/my run", "is not a valid model name; name it"),
        (f"base={tmp_path}/x", "'base' is served already"),
        ("bot=", "takes DIR or NAME=DIR"),
    ]:
        with pytest.raises(ParamError, match=match):
            watched_dirs([bad], [spec])
    with pytest.raises(ParamError, match="served already"):
        watched_dirs([f"{tmp_path}/x", f"x={tmp_path}/y"], [spec])


def test_watch_serves_each_finished_output(server, runs, tiny_llama_dir, tmp_path):
    a, b = runs
    want_a, want_b = _answer(server.url, "ref-a"), _answer(server.url, "ref-b")
    watch = server.watch
    assert "bot-w" not in _adapters(server.url)  # nothing there yet

    # a run in progress: no chatforge.json marked complete yet
    shutil.copytree(a, watch)
    ModelMeta(complete=False).write(watch)
    assert not wait_until(lambda: "bot-w" in _adapters(server.url), 0.5)
    finished(a, watch, tiny_llama_dir)  # the run ends
    assert wait_until(lambda: "bot-w" in _adapters(server.url), 15)
    assert _answer(server.url, "bot-w") == want_a

    # the next run writes its output there: bot-w is it, bot-w:v1 the one before
    shutil.rmtree(watch)
    finished(b, watch, tiny_llama_dir)
    assert wait_until(lambda: "bot-w:v1" in _adapters(server.url), 15)
    assert _answer(server.url, "bot-w") == want_b
    assert _answer(server.url, "bot-w:v1") == want_a

    # an output that does not load is logged; bot-w keeps serving b
    (watch / "adapter_model.safetensors").write_bytes(b"\x08" + b"\0" * 20)
    mark_finished(watch, tiny_llama_dir)
    assert wait_until(lambda: any("could not serve" in x for x in server.log.lines), 15)
    assert "adapter_model.safetensors" in server.log.lines[-1]
    assert _answer(server.url, "bot-w") == want_b
    assert "bot-w:v2" not in _adapters(server.url)

    # a full model in a watched directory: one warning, nothing served
    shutil.copytree(tiny_llama_dir, server.full)
    ModelMeta(prompt_format="chat_template").write(server.full)
    assert wait_until(lambda: any("full model" in x for x in server.log.lines), 15)
    wait_until(lambda: False, 0.5)
    assert sum("full model" in x for x in server.log.lines) == 1
    assert "full-w" not in _adapters(server.url)


def test_serve_cli_checks_watch_before_loading(tmp_path, capsys):
    from cli_helpers import run

    code, _, err = run(["serve", "--watch", f"{tmp_path}/my run"], capsys)
    assert code == 2 and "--watch: the folder name 'my run' is not a valid model name" in err


def test_publish_command(server, runs, tiny_llama_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from chatforge.cli.publish import publish_command

    app = typer.Typer()
    app.command()(publish_command)
    app.command("other")(lambda: None)  # (two commands: `publish` is named on the line)
    out = finished(runs[0], tmp_path / "cli-bot", tiny_llama_dir)
    argv = ["publish-command", str(out), "--serve-to", server.url, "--api-key", KEY]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"serving {out} as 'cli-bot'"
    assert "cli-bot" in _adapters(server.url)
