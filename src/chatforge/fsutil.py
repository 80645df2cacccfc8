"""Writing files so that a reader (or a crash) never sees half of one.

:func:`atomic_write` and :func:`atomic_file` write into a temporary file next
to the target (same directory, so same file system), flush and fsync it, then
``os.replace`` it over the target: the target holds either its old content or
all of the new, never a mix. When anything fails the temporary file is removed
and the old file, if any, is left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "atomic_path", "atomic_write"]


def atomic_write(path: str | os.PathLike[str], data: str | bytes, encoding: str = "utf-8") -> None:
    """Replace the file ``path`` by ``data`` (text is encoded with ``encoding``) atomically."""
    mode = "wb" if isinstance(data, bytes) else "w"
    with atomic_file(path, mode, encoding=encoding) as f:
        f.write(data)


@contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "w", encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """A file to write the new content of ``path`` into (``mode`` ``"w"`` or ``"wb"``);
    it replaces ``path`` when the block ends without an exception.

    >>> with atomic_file("loss.png", "wb") as f:  # doctest: +SKIP
    ...     fig.savefig(f, format="png")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes new files: mode must be 'w' or 'wb' (got {mode!r})")
    kwargs: dict[str, Any] = {} if mode == "wb" else {"encoding": encoding, "newline": ""}
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f  # (closed before atomic_path fsyncs and renames it)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (not a file
    object); once the block ends without an exception the file there is fsynced and
    replaces ``path``. Otherwise it is removed and ``path`` is left as it was."""
    target = Path(path)
    tmp, fd = _create_temp(target)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(target.parent)


def _create_temp(target: Path) -> tuple[Path, int]:
    """A new, empty file beside ``target`` and its descriptor; created with the
    usual permissions (0666 less the umask), as ``open(target, "w")`` would."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{os.urandom(4).hex()}.tmp")  # (secrets.token_hex)
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:  # pragma: no cover - a 1 in 4 billion clash
            continue


def _remove(path: Path) -> None:
    """Delete ``path`` if it is there (cleaning up after a failed write)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where directories can be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse it
        pass
    finally:
        os.close(fd)
