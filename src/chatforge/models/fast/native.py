"""Our CPU kernels (``kernels/*.c``): prebuilt at install, picked by CPU feature.

``qlinear.c``: weight-only int8/int4 (and fp32) linear layers, integer dot products;
``decode.c``: the forward pass of a Llama-family or GPT-2 model through all
layers in one call, for any rows (decode steps and prefill chunks alike).

torch's int8/int4 CPU kernels run at a third of this machine's memory
bandwidth at batch 1 (measured: ~9 GB/s of ~29 GB/s); decoding is bound by
that bandwidth, so the fast path has its own kernels. They are plain C (no
torch headers) called through ctypes, and found, in order:

1. installed: ``setup.py`` builds them when the package is installed, as
   variants for AVX-512 (+VNNI), AVX2, NEON (+dotprod, on aarch64) and plain C
   (``kernel_variants.py``); the best one this CPU runs is loaded;
2. compiled at first use: without a usable installed variant, the system C
   compiler builds them once with ``-march=native``, cached under the chatforge
   cache directory keyed by the source, the flags and the CPU (a failure is
   remembered there too, so it is not retried on every start);
3. torch's kernels: slower, same results within rounding (with a warning,
   except when asked for with ``CHATFORGE_NATIVE=0``).

``CHATFORGE_KERNELS`` overrides step 1: ``compile`` skips the installed variants,
a variant name (``avx2``, ...) loads only that one. ``kernel_path()`` says which
path runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from chatforge.models.fast import kernel_variants
from chatforge.paths import cache_dir

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
KERNELS = HERE / "kernels"
SOURCES = (KERNELS / "qlinear.c", KERNELS / "decode.c")
QK = 32  # inputs per quantisation block (the kernel's QK)
# Tried in order: the CPU's own vector units first, then plain C.
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
COMPILE_SECONDS = 5  # about how long compiling at first use takes (2 cores)
COST = "int8/int4 decoding runs about 3-6x slower on torch's kernels"
_path = "not loaded yet"  # what kernel_path() reports, set by kernels()


class KernelWarning(RuntimeWarning):
    """chatforge's C kernels are unavailable and torch's (slower) ones run instead."""


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


def installed_variants(where: Path = HERE) -> dict[str, Path]:
    """The kernel variants built at install time (name -> library), best first."""
    found = {}
    for v in kernel_variants.VARIANTS:
        libs = sorted(where.glob(f"{kernel_variants.PREFIX}{v.name}.*so"))
        if libs:
            found[v.name] = libs[0]
    return found


def _find_cc() -> str | None:
    """The C compiler to build with: ``$CC``, else cc, gcc or clang on the PATH."""
    return (
        os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    )


def _key(cc: str, flags: list[str]) -> str:
    """The cache key of a library built by ``cc`` with ``flags`` from today's sources."""
    source = b"".join(p.read_bytes() for p in (*SOURCES, KERNELS / "kernels.h"))
    text = " ".join([cc, *flags, platform.machine(), _cpu_id()])
    return hashlib.sha256(source + text.encode()).hexdigest()[:16]


def _failed_marker(out: Path, cc: str) -> Path:
    """The file that records a failed compile with ``cc`` (keyed like the libraries)."""
    return out / f"qlinear-{_key(cc, [f for flags in FLAG_SETS for f in flags])}.failed"


def _cached(out: Path, cc: str) -> tuple[Path, list[str]] | None:
    """A library compiled earlier (best flags first), with its flags."""
    for flags in FLAG_SETS:
        target = out / f"qlinear-{_key(cc, flags)}.so"
        if target.exists():
            return target, flags
    return None


def _build(cc: str, flags: list[str], out: Path) -> tuple[Path | None, str]:
    """Compile the library with ``flags`` into ``out``: its path, or None and why not."""
    target = out / f"qlinear-{_key(cc, flags)}.so"
    # Build beside the target and rename: a crash or a second process never
    # leaves a half-written library under the final name.
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".so.tmp")
    os.close(fd)
    cmd = [cc, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", tmp, "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        Path(tmp).unlink(missing_ok=True)
        return None, f"{cc}: {e}"
    if done.returncode == 0:
        os.replace(tmp, target)
        return target, ""
    Path(tmp).unlink(missing_ok=True)
    log.info("%s failed:\n%s", " ".join(cmd), done.stderr[-2000:])
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return None, f"{cc}: {last[:200]}"


def _compile(out: Path) -> Path | None:
    """The library compiled with this machine's compiler (cached); None where it cannot be."""
    return _compile_why(out)[0]


def _compile_why(out: Path) -> tuple[Path | None, str]:
    """``_compile``, with the flags used (or why it failed) as the second item."""
    cc = _find_cc()
    if not cc:
        return None, "no C compiler"
    cached = _cached(out, cc)
    if cached is not None:
        return cached[0], " ".join(cached[1])
    try:
        out.mkdir(parents=True, exist_ok=True)
        marker = _failed_marker(out, cc)
        if marker.exists():
            why = marker.read_text().strip() or "compiling failed"
            return None, f"{why}; remembered in {marker}, delete it to retry"
    except OSError as e:
        return None, f"cache directory unusable: {e}"
    print(f"compiling chatforge's CPU kernels (once, ~{COMPILE_SECONDS}s)...", file=sys.stderr)
    why = ""
    t0 = time.perf_counter()
    for flags in FLAG_SETS:
        target, why = _build(cc, flags, out)
        if target is not None:
            log.info("compiled the kernels in %.1f s: %s", time.perf_counter() - t0, flags)
            return target, " ".join(flags)
    why = f"compiling failed: {why}"
    try:
        marker.write_text(why + "\n")
    except OSError:
        pass
    return None, why


def _check(lib: ctypes.CDLL, variant: str | None) -> None:
    """Refuse a library whose vector code this CPU cannot run (e.g. built with odd CFLAGS)."""
    flags = kernel_variants.cpu_flags()  # empty when unknown: then trust the build
    avx2 = {"avx2", "fma", "f16c"} <= flags
    if lib.cf_has_avx2() and kernel_variants.is_x86() and flags and not avx2:
        raise OSError(f"{variant or 'the'} library uses AVX2, which this CPU lacks")
    lib.cf_isa.restype = ctypes.c_char_p
    if lib.cf_isa() == b"neon_dotprod" and flags and "asimddp" not in flags:
        raise OSError(f"{variant or 'the'} library uses the dot product, which this CPU lacks")


def _check_fresh(lib: ctypes.CDLL, variant: str) -> None:
    """Refuse an installed variant built from other sources (kernels edited since
    ``pip install -e .``): the library compiled at first use follows the sources."""
    try:
        # A char array in the library (not a char pointer): read it in place.
        built = (ctypes.c_char * 17).in_dll(lib, kernel_variants.HASH_SYMBOL).value
    except ValueError:
        built = b""
    if built.decode() != kernel_variants.source_hash(HERE):
        raise OSError(f"the {variant} library is stale (sources changed; pip install -e . again)")


def load_library(path: Path, variant: str | None = None) -> ctypes.CDLL:
    """Load a kernel library and declare its functions; OSError when it is unusable.

    ``variant``: an installed variant's name, checked to be built from today's sources.
    """
    lib = ctypes.CDLL(str(path))
    _check(lib, variant)
    if variant is not None:
        _check_fresh(lib, variant)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.cf_qlinear.argtypes = [ctypes.c_int, p, i64, i64, p, p, p, i64, p, ctypes.c_int]
    lib.cf_qlinear.restype = ctypes.c_int
    lib.cf_dequantize.argtypes = [ctypes.c_int, p, p, i64, i64, p, ctypes.c_int]
    lib.cf_dequantize.restype = None
    lib.cf_forward.argtypes = [ctypes.POINTER(CModel), p, i64, p, p, p, i64, ctypes.c_int, p, p]
    lib.cf_forward.restype = ctypes.c_int
    lib.cf_norm.argtypes = [p, p, p, ctypes.c_float, i64, i64, p]
    lib.cf_norm.restype = None
    return lib


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


class CLora(ctypes.Structure):
    """``cf_lora`` in decode.c: one adapter's delta on one linear."""

    _fields_ = [
        ("a_t", ctypes.c_void_p),
        ("b_t", ctypes.c_void_p),
        ("r", ctypes.c_int64),
        ("spans", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
    ]


def _load_installed(flags: frozenset[str]) -> tuple[ctypes.CDLL | None, str]:
    """The best installed variant this CPU runs (falling back to the next on a bad one)."""
    mode = os.environ.get("CHATFORGE_KERNELS", "auto")
    if mode == "compile":
        return None, "installed variants skipped (CHATFORGE_KERNELS=compile)"
    installed = installed_variants()
    if mode != "auto":
        installed = {k: v for k, v in installed.items() if k == mode}
    runs = [v.name for v in kernel_variants.runnable(flags) if v.name in installed]
    why = "no installed variant" if not runs else ""
    for name in runs:
        try:
            return load_library(installed[name], name), f"installed {name}"
        except (OSError, AttributeError) as e:  # corrupt, a missing libgomp, odd flags
            log.warning("chatforge's installed %s kernels are unusable: %s", name, e)
            why = f"installed {name} unusable: {e}"
    return None, why


def _load_compiled() -> tuple[ctypes.CDLL | None, str]:
    """The library compiled at first use; a corrupt cached one is rebuilt once."""
    for attempt in range(2):
        path, how = _compile_why(_cache_dir())
        if path is None:
            return None, how
        try:
            return load_library(path), f"compiled at first use ({how})"
        except (OSError, AttributeError) as e:  # a corrupt cached library, an unwritable cache
            if attempt == 0 and path.exists():
                path.unlink(missing_ok=True)
                continue
            return None, f"the compiled library does not load: {e}"
    return None, "the compiled library does not load"


def _warn_torch(why: str) -> None:
    """Say (visibly) that torch's kernels run instead of ours, why, and what it costs."""
    message = (
        f"chatforge's C kernels are unavailable ({why}); using torch's kernels instead: "
        f"{COST}. Reinstalling chatforge with a C compiler present builds them; "
        "CHATFORGE_NATIVE=0 chooses torch's kernels without this warning."
    )
    # No source line under the message: it is about the machine, not the caller's code.
    warnings.warn_explicit(message, KernelWarning, "chatforge", 0, module=__name__)


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where none can be had or it is switched off."""
    global _path
    if os.environ.get("CHATFORGE_NATIVE", "1") == "0":
        _path = "torch (CHATFORGE_NATIVE=0)"
        return None
    lib, why = _load_installed(kernel_variants.cpu_flags())
    if lib is not None:
        _path = why
        return lib
    log.info("no installed kernels: %s", why)
    lib, how = _load_compiled()
    if lib is not None:
        _path = how
        return lib
    _path = "torch (no compiler)" if how == "no C compiler" else f"torch ({how.split(';')[0]})"
    _warn_torch(how)
    return None


def kernel_path() -> str:
    """Which kernels run: "installed avx512", "compiled at first use (-O3 -march=native
    -fopenmp)", "torch (no compiler)", "torch (CHATFORGE_NATIVE=0)", ..."""
    kernels()
    return _path


def available() -> bool:
    """True when the compiled kernels can be used."""
    return kernels() is not None


def qlinear(kind: int, x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None, n: int) -> Tensor:
    """y (M, N) fp32 = x (M, K) fp32 times the weight (N, K) transposed (+ bias).

    ``kind`` 32: ``w`` fp32 (N, K); 9: int8 (a scale per row), 8: Q8_0 blocks, 5:
    Q4_1 blocks, in the layouts of ``linear.repack_q8`` / ``repack_q4`` (see
    kernels/qlinear.c). All contiguous.
    """
    lib = kernels()
    assert lib is not None
    m, k = x.shape
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


def dequantize(
    kind: int, w: Tensor, scales: Tensor, n: int, k: int, out: Tensor | None = None
) -> Tensor:
    """The fp32 (N, K) weight of a quantised layer, kind 9, 8 or 5 (into ``out`` when given)."""
    lib = kernels()
    assert lib is not None
    if out is None:
        out = torch.empty((n, k), dtype=torch.float32)
    assert out.shape == (n, k) and out.dtype == torch.float32 and out.is_contiguous()
    lib.cf_dequantize(
        kind, w.data_ptr(), scales.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads()
    )
    return out


def forward(
    model: CModel,
    x: Tensor,
    pos: Tensor,
    seq: Tensor,
    tables: Tensor,
    row_lora: Tensor | None = None,
    loras: ctypes.Array | None = None,
) -> None:
    """Run rows ``x`` (R, hidden) fp32, in place, through every layer (see decode.c).

    pos (R,) int64: each row's position; seq (R,) int32: its sequence, whose block
    table is row ``seq[r]`` of ``tables`` (S, max_blocks) int32. All contiguous.
    row_lora (R,) int32: each row's LoRA adapter slot in ``loras`` (a flat
    ``CLora`` array, (n_adapters, n_layers, 4)), -1 for none; both None: no adapters.
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
        None if row_lora is None else row_lora.data_ptr(),
        None if loras is None else ctypes.addressof(loras),
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
