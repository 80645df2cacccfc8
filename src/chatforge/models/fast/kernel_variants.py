"""The prebuilt variants of our C kernels, and which one a CPU can run.

Shared by ``setup.py`` (which builds every variant when the package is installed)
and ``native.py`` (which loads the best one the CPU supports). Standard library
only: ``setup.py`` loads this file by path, before anything is installed.

Every variant is the same library (``kernels/qlinear.c`` and ``kernels/decode.c``)
compiled for a given instruction set, never ``-march=native``, so one build (a
wheel) runs on any machine of its architecture: the kernels pick their code
paths at compile time (``#if defined(__AVX2__) ...``), and the loader picks the
variant at run time from the CPU's flags.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "chatforge.models.fast"  # where the built libraries live
PREFIX = "_kernels_"  # chatforge.models.fast._kernels_avx2 (a .so, loaded with ctypes)
SOURCES = ("kernels/qlinear.c", "kernels/decode.c")  # relative to this directory
HEADERS = ("kernels/kernels.h",)
HASH_SYMBOL = "cf_source_hash"  # a string in each built library: source_hash() at build time
# (stamp_source() is the C file that defines it; source_hash() is the hash itself)
OPENMP = "-fopenmp"  # dropped (and the build retried) where the compiler lacks it

_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c")
_AVX512_CPU = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"})


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: its compiler flags and the CPU flags it needs."""

    name: str
    flags: tuple[str, ...]
    needs: frozenset[str]
    x86_only: bool = True

    @property
    def module(self) -> str:
        """The extension's dotted name (setuptools builds it as ``<module>.<EXT_SUFFIX>``)."""
        return f"{PACKAGE}.{PREFIX}{self.name}"


# Best first. avx512vnni is avx512 plus -mavx512vnni (built only where the compiler
# takes that flag): the compiler may then emit VNNI instructions, so it needs a CPU
# with them; plain avx512 stays for AVX-512 CPUs without VNNI (Skylake-X).
VARIANTS = (
    Variant("avx512vnni", ("-O3", *_AVX512, "-mavx512vnni"), _AVX512_CPU | {"avx512_vnni"}),
    Variant("avx512", ("-O3", *_AVX512), _AVX512_CPU),
    Variant("avx2", ("-O3", "-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"})),
    Variant("generic", ("-O3",), frozenset(), x86_only=False),
)

# macOS' sysctl spells some flags differently from Linux' /proc/cpuinfo.
_ALIASES = {"avx512vnni": "avx512_vnni", "avx1.0": "avx"}


def source_hash(directory: Path) -> str:
    """A short hash of the kernels' sources under ``directory`` (this file's directory)."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:16]


def stamp_source(directory: Path) -> str:
    """C source defining HASH_SYMBOL, compiled into each variant to detect stale builds."""
    return f'const char {HASH_SYMBOL}[] = "{source_hash(directory)}";\n'


def is_x86(machine: str | None = None) -> bool:
    """True on x86-64 (and 32-bit x86), where the AVX variants can run."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def parse_flags(text: str) -> frozenset[str]:
    """CPU flags from a ``/proc/cpuinfo`` ``flags`` line or ``sysctl`` feature lists."""
    words = text.replace(":", " ").lower().split()
    return frozenset(_ALIASES.get(w, w) for w in words)


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (lower case, Linux spelling); empty when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return parse_flags(line.split(":", 1)[1])
    except OSError:
        pass
    if platform.system() == "Darwin":
        return _sysctl_flags()
    return frozenset()


def _sysctl_flags() -> frozenset[str]:
    """macOS: the features sysctl lists (Intel Macs; none on Apple silicon)."""
    keys = ["machdep.cpu.features", "machdep.cpu.leaf7_features"]
    try:
        done = subprocess.run(["sysctl", "-n", *keys], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return parse_flags(done.stdout)


def runnable(flags: Iterable[str], machine: str | None = None) -> list[Variant]:
    """The variants a CPU with ``flags`` can run, best first."""
    have = frozenset(flags)
    x86 = is_x86(machine)
    return [v for v in VARIANTS if (x86 or not v.x86_only) and v.needs <= have]


def choose(
    flags: Iterable[str], installed: Iterable[str], machine: str | None = None
) -> str | None:
    """The best of the ``installed`` variants (names) a CPU with ``flags`` runs, or None."""
    have = set(installed)
    return next((v.name for v in runnable(flags, machine) if v.name in have), None)
