"""Our CPU kernels (``kernels/*.c``), built once per machine.

``qlinear.c``: weight-only int8/int4 (and fp32) linear layers for few rows;
``decode.c``: the forward pass of a Llama-family or GPT-2 model through all
layers in one call, for any rows (decode steps and prefill chunks alike).

torch's int8/int4 CPU kernels run at a third of this machine's memory
bandwidth at batch 1 (measured: ~9 GB/s of ~29 GB/s); decoding is bound by
that bandwidth, so the fast path has its own kernels. They are plain C (no
torch headers, so building takes about a second), compiled with the system C
compiler the first time they are needed, cached under the chatforge cache
directory keyed by the source, the compiler flags and the CPU, and called
through ctypes. Without a compiler (or with ``CHATFORGE_NATIVE=0``) the
linears fall back to torch's kernels: slower, same results within rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from chatforge.paths import cache_dir

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
SOURCES = (KERNELS / "qlinear.c", KERNELS / "decode.c")
QK = 32  # inputs per quantisation block (the kernel's QK)
# Tried in order: the CPU's own vector units first, then plain C.
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return cache_dir() / "kernels"


def _compile(out: Path) -> Path | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        log.info("no C compiler found; using torch's quantised kernels")
        return None
    source = b"".join(p.read_bytes() for p in (*SOURCES, KERNELS / "kernels.h"))
    for flags in FLAG_SETS:
        key = hashlib.sha256(
            source + " ".join([cc, *flags, platform.machine(), _cpu_id()]).encode()
        ).hexdigest()[:16]
        target = out / f"qlinear-{key}.so"
        if target.exists():
            return target
        out.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: a crash or a second process never
        # leaves a half-written library under the final name.
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".so.tmp")
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            done = None
            log.info("compiling the kernels failed: %s", e)
        if done is not None and done.returncode == 0:
            os.replace(tmp, target)
            return target
        Path(tmp).unlink(missing_ok=True)
        if done is not None:
            log.info("%s failed:\n%s", " ".join(cmd), done.stderr[-2000:])
    return None


class CLin(ctypes.Structure):
    """``cf_lin`` in kernels.h."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("w", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
    ]


class CLayer(ctypes.Structure):
    """``cf_layer`` in decode.c."""

    _fields_ = [
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("norm1_b", ctypes.c_void_p),
        ("norm2_b", ctypes.c_void_p),
        ("qkv", CLin),
        ("out", CLin),
        ("up", CLin),
        ("down", CLin),
    ]


class CModel(ctypes.Structure):
    """``cf_model`` in decode.c."""

    _fields_ = [
        ("n_layers", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        ("n_heads", ctypes.c_int32),
        ("n_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("inter", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("arch", ctypes.c_int32),
        ("block", ctypes.c_int64),
        ("layers", ctypes.POINTER(CLayer)),
        ("k_cache", ctypes.POINTER(ctypes.c_void_p)),
        ("v_cache", ctypes.POINTER(ctypes.c_void_p)),
        ("rope", ctypes.c_void_p),
    ]


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot be built or is switched off."""
    path: Path | None = None
    if os.environ.get("CHATFORGE_NATIVE", "1") == "0":
        return None
    lib = None
    for attempt in range(2):
        try:
            path = _compile(_cache_dir())
            if path is None:
                return None
            lib = ctypes.CDLL(str(path))
            break
        except OSError as e:  # a corrupt cached library (rebuilt once), an unwritable cache
            if attempt == 0 and path is not None and path.exists():
                path.unlink(missing_ok=True)
                continue
            log.warning("chatforge's C kernels could not be loaded (%s); using torch's", e)
            return None
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.cf_qlinear.argtypes = [ctypes.c_int, p, i64, i64, p, p, p, i64, p, ctypes.c_int]
    lib.cf_qlinear.restype = ctypes.c_int
    lib.cf_dequantize.argtypes = [ctypes.c_int, p, p, i64, i64, p, ctypes.c_int]
    lib.cf_dequantize.restype = None
    lib.cf_forward.argtypes = [ctypes.POINTER(CModel), p, i64, p, p, p, i64, ctypes.c_int]
    lib.cf_forward.restype = ctypes.c_int
    lib.cf_norm.argtypes = [p, p, p, ctypes.c_float, i64, i64, p]
    lib.cf_norm.restype = None
    return lib


def available() -> bool:
    """True when the compiled kernels can be used."""
    return kernels() is not None


def qlinear(kind: int, x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """y (M, N) fp32 = x (M, K) fp32 times the quantised weight transposed (+ bias).

    ``kind`` 8: ``w`` int8 (N, K), ``scales`` fp32 (N,); ``kind`` 4: ``w`` uint8
    (N, K/2), ``scales`` fp16 (N, 2, K/32): scales then offsets. All contiguous.
    """
    lib = kernels()
    assert lib is not None
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    rc = lib.cf_qlinear(
        kind,
        x.data_ptr(),
        m,
        k,
        w.data_ptr(),
        scales.data_ptr(),
        None if bias is None else bias.data_ptr(),
        n,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if rc:
        raise MemoryError("out of memory in the quantised linear kernel")
    return y


def dequantize(kind: int, w: Tensor, scales: Tensor, k: int, out: Tensor | None = None) -> Tensor:
    """The fp32 (N, K) weight of a quantised layer (into ``out`` when given)."""
    lib = kernels()
    assert lib is not None
    n = w.shape[0]
    if out is None:
        out = torch.empty((n, k), dtype=torch.float32)
    assert out.shape == (n, k) and out.dtype == torch.float32 and out.is_contiguous()
    lib.cf_dequantize(
        kind, w.data_ptr(), scales.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads()
    )
    return out


def forward(model: CModel, x: Tensor, pos: Tensor, seq: Tensor, tables: Tensor) -> None:
    """Run rows ``x`` (R, hidden) fp32, in place, through every layer (see decode.c).

    pos (R,) int64: each row's position; seq (R,) int32: its sequence, whose block
    table is row ``seq[r]`` of ``tables`` (S, max_blocks) int32. All contiguous.
    """
    lib = kernels()
    assert lib is not None
    rc = lib.cf_forward(
        ctypes.byref(model),
        x.data_ptr(),
        x.shape[0],
        pos.data_ptr(),
        seq.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        torch.get_num_threads(),
    )
    if rc:
        raise MemoryError("out of memory in the forward kernel")


def norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """RMSNorm (``bias`` None) or LayerNorm of the rows of ``x`` (R, H) fp32, per row in C."""
    lib = kernels()
    assert lib is not None
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.cf_norm(
        x.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        eps,
        x.shape[0],
        x.shape[1],
        y.data_ptr(),
    )
    return y
