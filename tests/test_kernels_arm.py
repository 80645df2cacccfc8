"""The ARM kernels (variants neon and neon_dotprod), verified by emulation: built with
Debian's cross compiler (``gcc-aarch64-linux-gnu``) into ``native_check/kernel_check``,
which runs every kernel against the plain-C build of the same sources, and run under
``qemu-aarch64`` (Debian's ``qemu-user``; ``.ci/run`` installs both). Their integer
kernels must give the same bytes as this machine's own build: one hash of all those
outputs for x86 and ARM alike. Nothing here times them: an emulator's speed says
nothing about an ARM chip's."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chatforge.models.fast import kernel_variants as kv
from chatforge.models.fast import native

pytestmark = pytest.mark.slow  # compiles, and runs an emulator

CHECK = Path(__file__).parent / "native_check"
CROSS, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
VARIANTS = {v.name: v for v in kv.VARIANTS}
# An ARMv8.0 core (no dot product), and qemu's everything-on CPU (dot product).
ARMV8_0, ARMV8_MAX = "cortex-a53", "max"


def _missing() -> str | None:
    tools = [t for t in (CROSS, QEMU) if shutil.which(t) is None]
    if tools:
        return (
            f"{' and '.join(tools)} not installed (Debian: apt-get install "
            "gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)"
        )
    return None


def _parallel(commands: list[list[str]]) -> None:
    """Run the compiler commands two at a time (2 cores); fail with the first error."""

    def one(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        for cmd, done in zip(commands, pool.map(one, commands), strict=True):
            assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _report(done: subprocess.CompletedProcess) -> dict[str, str]:
    """kernel_check's output lines as {first word: the rest}; it must have passed."""
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert done.stdout.splitlines()[-1] == "ok", done.stdout
    return lines


@pytest.fixture(scope="module")
def host_report(tmp_path_factory) -> dict[str, str]:
    """kernel_check built for the best variant this machine runs (that its compiler
    builds: an old one may refuse -mavx512vnni) and run here."""
    cc = native._find_cc()
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("host") / "kernel_check"
    srcs = [str(CHECK / f) for f in ("kernel_check.c", "kernels_under_test.c", "kernels_plain.c")]
    for variant in kv.runnable(kv.cpu_flags()):
        flags = [*variant.flags, "-fopenmp", "-I", str(native.KERNELS)]
        if _run([cc, *flags, *srcs, "-lm", "-o", str(out)]).returncode == 0:
            report = _report(_run([str(out)]))
            assert report["isa"] == variant.name
            return report
    pytest.fail(f"{cc} builds no variant of kernel_check")


@pytest.fixture(scope="module")
def arm_programs(tmp_path_factory) -> dict[str, Path]:
    """kernel_check for the neon and neon_dotprod variants, static aarch64 programs
    (qemu-aarch64 then needs no ARM libraries)."""
    why = _missing()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("arm")
    base = [CROSS, "-fopenmp", "-I", str(native.KERNELS), "-c"]
    # The driver and the plain-C reference once (plain ARMv8.0), the kernels per variant.
    commands = [
        [*base, *VARIANTS["neon"].flags, str(CHECK / f), "-o", str(tmp / f"{f}.o")]
        for f in ("kernel_check.c", "kernels_plain.c")
    ]
    commands += [
        [*base, *VARIANTS[n].flags, str(CHECK / "kernels_under_test.c"), "-o", str(tmp / f"{n}.o")]
        for n in ("neon", "neon_dotprod")
    ]
    _parallel(commands)
    programs = {n: tmp / n for n in ("neon", "neon_dotprod")}
    common = [str(tmp / "kernel_check.c.o"), str(tmp / "kernels_plain.c.o")]
    _parallel(
        [
            [CROSS, "-static", "-fopenmp", *common, str(tmp / f"{n}.o"), "-lm", "-o", str(p)]
            for n, p in programs.items()
        ]
    )
    return programs


def test_neon_kernels_match_plain_c_and_x86_bit_for_bit(arm_programs, host_report):
    """neon on an ARMv8.0 core: its quantised linears and dequantisation are the plain-C
    bytes, the same as this machine's build; its float kernels are close."""
    report = _report(_run([QEMU, "-cpu", ARMV8_0, str(arm_programs["neon"])]))
    assert report["isa"] == "neon"
    assert report["exact"] == host_report["exact"]


def test_neon_dotprod_kernels_match_plain_c_and_x86_bit_for_bit(arm_programs, host_report):
    report = _report(_run([QEMU, "-cpu", ARMV8_MAX, str(arm_programs["neon_dotprod"])]))
    assert report["isa"] == "neon_dotprod"
    assert report["exact"] == host_report["exact"]


def test_the_dotprod_build_needs_a_cpu_with_it(arm_programs):
    """On an ARMv8.0 core the neon_dotprod build dies on its first sdot (SIGILL): its dot
    products are really in it, and dispatch must (and does) keep it off such CPUs."""
    done = _run([QEMU, "-cpu", ARMV8_0, str(arm_programs["neon_dotprod"])])
    assert done.returncode != 0
    assert kv.choose({"asimd"}, ["neon_dotprod", "neon", "generic"], "aarch64") == "neon"
