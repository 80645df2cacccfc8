"""Start-up: commands that need no model answer without importing torch (< 1 s, not ~9 s)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
from chatforge.cli.app import main
code = main({argv!r})
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
print("HEAVY", heavy, "CODE", code)
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["-h"], ["--version"], ["logs", "list"], ["models", "list"], ["chat", "--help"]],
)
def test_light_commands_do_not_import_torch(argv, tmp_path):
    env = {"CHATFORGE_DATA": str(tmp_path / "data"), "CHATFORGE_CACHE": str(tmp_path / "cache")}
    import os

    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(argv=argv)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert "HEAVY [] CODE 0" in done.stdout, done.stdout + done.stderr


def test_version_and_lazy_public_names():
    import chatforge

    assert chatforge.__version__
    assert chatforge.GenerationConfig(temperature=0).greedy
    with pytest.raises(AttributeError):
        chatforge.no_such_name  # noqa: B018
