"""Running ``chatforge`` in-process, as its console script does."""

from __future__ import annotations

import io
import sys

from chatforge.cli.app import main


def run(argv: list[str], capsys, stdin: str = "") -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``chatforge ARGV`` with ``stdin`` piped in."""
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = main(argv)
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return code, out, err
