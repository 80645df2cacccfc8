"""Convert a GGUF file into a cached Hugging Face directory (safetensors).

Transformers can read GGUF but dequantises every tensor on each load (~20 s for
SmolLM2-135M); we do that once and keep the result in the cache directory, so
later loads read safetensors in a few seconds. The conversion is atomic: it is
written to a temporary directory, fsynced and renamed, and its ``chatforge.json``
marks it complete, so an interrupted conversion is never mistaken for a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from chatforge.errors import ModelLoadError
from chatforge.models.meta import ModelMeta
from chatforge.paths import models_cache_dir

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """Fail with a clear message when ``path`` is missing or not a GGUF file."""
    if not path.exists():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a valid GGUF file (it does not start with the GGUF magic bytes); "
            "re-download or re-export it"
        )
    try:  # parse the header and tensor table (memory-mapped: fast) before any conversion
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(
            f"could not read GGUF file {path}: {_short(e)}; it may be truncated or corrupt"
        ) from e


def cache_key(path: Path) -> str:
    """A cache directory name that changes when the file does (path, size, mtime)."""
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{h[:10]}"


def converted_dir(path: Path, name: str | None = None) -> Path:
    """Where the conversion of ``path`` lives (or will live) in the cache."""
    return models_cache_dir() / (name or cache_key(path))


def is_complete(directory: Path) -> bool:
    meta = ModelMeta.read(directory)
    return bool(meta and meta.complete and (directory / "config.json").exists())


def _fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def convert_gguf(path: Path, name: str | None = None, display_name: str | None = None) -> Path:
    """Return a cached HF directory for the GGUF file, converting it first if needed."""
    path = Path(path).expanduser()
    check_gguf(path)
    target = converted_dir(path, name)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    try:
        _convert_into(path, tmp, display_name or path.stem)
        _fsync_tree(tmp)
        if target.exists():  # an incomplete leftover (or a concurrent conversion finished)
            if is_complete(target):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1fs into %s", path, time.perf_counter() - t0, target)
    return target


def _convert_into(path: Path, out: Path, display_name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    out.mkdir(parents=True)
    # The meta file goes first with complete=False: a crash leaves a directory that
    # is recognisably partial.
    ModelMeta(prompt_format=None, name=display_name, source=str(path), complete=False).write(out)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(
        f"Converting {path.name} once into {out.parent} (about 20 s; later loads are fast)...",
        file=sys.stderr,
        flush=True,
    )
    try:
        # The GGUF reader draws its own tqdm bars; keep them off the user's terminal.
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf's reader raises many kinds of errors on bad files
        raise ModelLoadError(f"could not read GGUF file {path}: {_short(e)}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    # The weights are dequantised floats now; drop the GGUF quantisation marker so
    # save_pretrained writes ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = display_name
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    fmt = "chat_template" if getattr(tok, "chat_template", None) else None
    ModelMeta(prompt_format=fmt, name=display_name, source=str(path), complete=True).write(out)


def _short(e: BaseException) -> str:
    """The first line of an exception's message (library errors can be long)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
