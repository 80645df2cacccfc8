"""The prebuilt variants of our C kernels, and which one a CPU can run.

Shared by ``setup.py`` (which builds every variant when the package is installed)
and ``native.py`` (which loads the best one the CPU supports). Standard library
only: ``setup.py`` loads this file by path, before anything is installed.

Every variant is the same library (``kernels/qlinear.c`` and ``kernels/decode.c``)
compiled for a given instruction set, never ``-march=native``, so one build (a
wheel) runs on any machine of its architecture: the kernels pick their code
paths at compile time (``#if defined(__AVX2__) ...``, ``__ARM_FEATURE_DOTPROD``),
and the loader picks the variant at run time from the CPU's flags: x86's
``/proc/cpuinfo`` ``flags``, aarch64's ``Features`` (or the kernel's HWCAP bits),
macOS' ``sysctl``.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
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
    arch: str | None = "x86"  # the architecture it is built for (arch()); None: any

    @property
    def module(self) -> str:
        """The extension's dotted name (setuptools builds it as ``<module>.<EXT_SUFFIX>``)."""
        return f"{PACKAGE}.{PREFIX}{self.name}"


# Best first. avx512vnni is avx512 plus -mavx512vnni (built only where the compiler
# takes that flag): the compiler may then emit VNNI instructions, so it needs a CPU
# with them; plain avx512 stays for AVX-512 CPUs without VNNI (Skylake-X).
# On aarch64 NEON is always there (armv8-a); neon_dotprod adds armv8.2's sdot
# (Linux' "asimddp": Cortex-A55/A76 on, Neoverse, Graviton 2+, every Apple chip).
# generic is plain C (CF_PLAIN): the reference every variant matches bit for bit in
# its integer kernels (tests/native_check), and the build for other architectures.
VARIANTS = (
    Variant("avx512vnni", ("-O3", *_AVX512, "-mavx512vnni"), _AVX512_CPU | {"avx512_vnni"}),
    Variant("avx512", ("-O3", *_AVX512), _AVX512_CPU),
    Variant("avx2", ("-O3", "-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"})),
    Variant("neon_dotprod", ("-O3", "-march=armv8.2-a+dotprod"), frozenset({"asimddp"}), "aarch64"),
    Variant("neon", ("-O3", "-march=armv8-a"), frozenset(), "aarch64"),
    Variant("generic", ("-O3", "-DCF_PLAIN"), frozenset(), None),
)
# Flags a compiler may not take (an old one, or one for another CPU): setup.py tries
# each on an empty function first and skips the variant that needs a refused one.
PROBED = ("-mavx512vnni", "-march=armv8.2-a+dotprod", "-march=armv8-a")
# Linux' aarch64 HWCAP bits (getauxval(AT_HWCAP), asm/hwcap.h), where /proc/cpuinfo
# is unreadable: the flags they stand for.
_AT_HWCAP = 16
_HWCAP_BITS = {1: "asimd", 20: "asimddp"}

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


def arch(machine: str | None = None) -> str:
    """``"x86"``, ``"aarch64"`` (Linux' aarch64, macOS' arm64) or the machine's own name."""
    name = (machine or platform.machine()).lower()
    if is_x86(name):
        return "x86"
    return "aarch64" if name in ("aarch64", "arm64", "armv8l") else name


def parse_flags(text: str) -> frozenset[str]:
    """CPU flags from a ``/proc/cpuinfo`` ``flags`` line or ``sysctl`` feature lists."""
    words = text.replace(":", " ").lower().split()
    return frozenset(_ALIASES.get(w, w) for w in words)


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (lower case, Linux spelling); empty when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            # x86 lists "flags", aarch64 "Features" (fp asimd ... asimddp ...)
            if line.startswith(("flags", "Features")):
                return parse_flags(line.split(":", 1)[1])
    except OSError:
        pass
    if platform.system() == "Darwin":
        return _sysctl_flags()
    if arch() == "aarch64":
        return hwcap_flags(_auxv_hwcap())
    return frozenset()


def hwcap_flags(hwcap: int | None) -> frozenset[str]:
    """The aarch64 flags of an ``AT_HWCAP`` value (None: unknown, no flags)."""
    if hwcap is None:
        return frozenset()
    return frozenset(name for bit, name in _HWCAP_BITS.items() if hwcap >> bit & 1)


def _auxv_hwcap() -> int | None:
    """``getauxval(AT_HWCAP)``, read from ``/proc/self/auxv`` (64-bit pairs)."""
    try:
        data = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return None
    for i in range(0, len(data) - 15, 16):
        key = int.from_bytes(data[i : i + 8], sys.byteorder)
        if key == _AT_HWCAP:
            return int.from_bytes(data[i + 8 : i + 16], sys.byteorder)
    return None


def _sysctl_flags() -> frozenset[str]:
    """macOS: the features sysctl lists (Intel Macs), or Apple silicon's dot product."""
    if arch() == "aarch64":  # hw.optional.arm.FEAT_DotProd: 1 on every Apple chip so far
        done = _sysctl(["hw.optional.arm.FEAT_DotProd"]).strip()
        if not done:
            return frozenset()  # unknown
        return frozenset({"asimd", "asimddp"} if done == "1" else {"asimd"})
    return parse_flags(_sysctl(["machdep.cpu.features", "machdep.cpu.leaf7_features"]))


def _sysctl(keys: list[str]) -> str:
    """What ``sysctl -n keys`` prints ("" when it cannot run)."""
    try:
        done = subprocess.run(["sysctl", "-n", *keys], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def runnable(flags: Iterable[str], machine: str | None = None) -> list[Variant]:
    """The variants a CPU with ``flags`` can run, best first."""
    have = frozenset(flags)
    here = arch(machine)
    return [v for v in VARIANTS if v.arch in (None, here) and v.needs <= have]


def choose(
    flags: Iterable[str], installed: Iterable[str], machine: str | None = None
) -> str | None:
    """The best of the ``installed`` variants (names) a CPU with ``flags`` runs, or None."""
    have = set(installed)
    return next((v.name for v in runnable(flags, machine) if v.name in have), None)
