"""The C kernels as installed: variant dispatch by CPU flags, the installed variants
against the library compiled at first use, the (remembered) failure of that compile,
and ``chatforge models info`` naming the kernels."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from chatforge.models.fast import kernel_variants as kv
from chatforge.models.fast import native
from chatforge.models.fast.linear import Int4Linear, Int8Linear
from cli_helpers import run
from test_native import q8_0

AVX2 = {"avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
ALL = ["avx512vnni", "avx512", "avx2", "generic"]
ARM = ["neon_dotprod", "neon", "generic"]
# /proc/cpuinfo's Features of a Neoverse N1 (Graviton 2, shortened) and of a Cortex-A53.
N1 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc asimddp"
A53 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"


@pytest.mark.parametrize(
    ("flags", "installed", "machine", "expected"),
    [
        (AVX512 | {"avx512_vnni"}, ALL, "x86_64", "avx512vnni"),
        (AVX512, ALL, "x86_64", "avx512"),  # Skylake-X: no VNNI
        (AVX512 - {"avx512dq"}, ALL, "x86_64", "avx2"),  # incomplete AVX-512
        (AVX2, ALL, "x86_64", "avx2"),
        (AVX2 - {"f16c"}, ALL, "x86_64", "generic"),
        (set(), ALL, "x86_64", "generic"),
        (AVX512 | {"avx512_vnni"}, ["avx2", "generic"], "x86_64", "avx2"),  # not built
        (AVX512, ["avx512vnni"], "x86_64", None),  # nothing it can run
        (AVX512, ALL, "aarch64", "generic"),  # x86 flags mean nothing elsewhere
        (AVX2, [], "x86_64", None),
        (kv.parse_flags(N1), ARM, "aarch64", "neon_dotprod"),
        (kv.parse_flags(N1), ARM, "arm64", "neon_dotprod"),  # macOS' name
        (kv.parse_flags(A53), ARM, "aarch64", "neon"),  # no dot product
        (set(), ARM, "aarch64", "neon"),  # flags unknown: NEON is always there
        (kv.parse_flags(N1), ["generic"], "aarch64", "generic"),
        (kv.parse_flags(N1), ARM, "x86_64", "generic"),  # ARM builds never on x86
        (AVX2, ARM + ["avx2"], "x86_64", "avx2"),
    ],
)
def test_dispatch_picks_the_best_variant_the_cpu_runs(flags, installed, machine, expected):
    assert kv.choose(flags, installed, machine) == expected


def test_macos_sysctl_flags_are_understood():
    features = "FPU VME SSE SSE2 FMA F16C AVX1.0 POPCNT"
    leaf7 = "AVX2 BMI1 AVX512F AVX512DQ AVX512BW AVX512VL AVX512VNNI"
    flags = kv.parse_flags(f"{features} {leaf7}")
    assert kv.choose(flags, ALL, "x86_64") == "avx512vnni"
    assert kv.choose(kv.parse_flags(features), ALL, "x86_64") == "generic"


def test_aarch64_hwcap_bits_are_understood():
    assert kv.hwcap_flags(None) == frozenset()
    assert kv.hwcap_flags(1 << 1 | 1 << 20 | 1) == {"asimd", "asimddp"}
    assert kv.hwcap_flags(0b11) == {"asimd"}


def test_variants_are_built_for_their_architecture():
    assert kv.arch("x86_64") == "x86" and kv.arch("AMD64") == "x86"
    assert kv.arch("aarch64") == kv.arch("arm64") == "aarch64"
    assert [v.name for v in kv.runnable(set(), "riscv64")] == ["generic"]


def _qlinear(lib: ctypes.CDLL, lin, x: torch.Tensor) -> torch.Tensor:
    """``x`` times ``lin``'s quantised weight through ``lib``'s cf_qlinear."""
    y = torch.empty(x.shape[0], lin.out_features)
    rc = lib.cf_qlinear(
        lin.kind, x.data_ptr(), x.shape[0], x.shape[1], lin.weight_q.data_ptr(),
        lin.scales.data_ptr(), None, lin.out_features, y.data_ptr(), 1,
    )  # fmt: skip
    assert rc == 0
    return y


@pytest.mark.slow  # subprocesses, compiles or a model load
def test_installed_variants_match_the_library_compiled_at_first_use():
    runs = [v.name for v in kv.runnable(kv.cpu_flags())]
    installed = {k: p for k, p in native.installed_variants().items() if k in runs}
    if not installed:
        pytest.skip("no installed kernel variant this CPU runs (pip install -e . builds them)")
    if os.environ.get("CHATFORGE_KERNELS", "auto") == "auto":
        assert native.kernel_path() == f"installed {next(iter(installed))}"
    compiled = native._compile(native._cache_dir())
    if compiled is None:
        pytest.skip("no C compiler to compare with")
    ref = native.load_library(compiled)
    torch.manual_seed(0)
    w, x = torch.randn(40, 96), torch.randn(3, 96)
    lins = Int8Linear(w, None), Int4Linear(w, None), q8_0(w, None)
    for name, path in installed.items():
        lib = native.load_library(path, name)
        assert lib.cf_has_avx2() == name.startswith("avx")
        assert lib.cf_isa().decode() == name  # the vector code it was built with
        for lin in lins:
            got, want = _qlinear(lib, lin, x), _qlinear(ref, lin, x)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (name, lin.kind)


START = (
    "import warnings\n"
    "warnings.simplefilter('default')\n"
    "from chatforge.models.fast import native\n"
    "assert native.kernels() is None\n"
    "print('PATH', native.kernel_path())\n"
)


def _start(env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "CHATFORGE_KERNELS": "compile", "CC": "/bin/false", **env}
    full.pop("CHATFORGE_NATIVE", None)
    return subprocess.run(
        [sys.executable, "-c", START], capture_output=True, text=True, env=full, timeout=120
    )


@pytest.mark.slow  # subprocesses, compiles or a model load
def test_a_failing_compiler_warns_and_is_not_retried(tmp_path):
    env = {"CHATFORGE_CACHE": str(tmp_path)}
    first = _start(env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("compiling chatforge's CPU kernels (once") == 1
    assert first.stderr.count("KernelWarning") == 1
    assert "slower" in first.stderr and "/bin/false" in first.stderr
    assert "PATH torch (compiling failed" in first.stdout
    assert list((tmp_path / "kernels").glob("*.failed"))
    second = _start(env)  # the failure is remembered: no second compile
    assert second.returncode == 0, second.stderr
    assert "compiling chatforge's" not in second.stderr
    assert second.stderr.count("KernelWarning") == 1
    assert "remembered in" in second.stderr


def test_chatforge_native_0_chooses_torch_without_a_warning(monkeypatch):
    monkeypatch.setenv("CHATFORGE_NATIVE", "0")
    native.kernels.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning fails the test
            assert native.kernels() is None
        assert native.kernel_path() == "torch (CHATFORGE_NATIVE=0)"
    finally:
        native.kernels.cache_clear()


def test_a_corrupt_installed_variant_is_passed_over(tmp_path, monkeypatch):
    bad = tmp_path / "_kernels_generic.cpython-311-x86_64-linux-gnu.so"
    bad.write_bytes(b"not a library")
    monkeypatch.setattr(native, "installed_variants", lambda: {"generic": bad})
    monkeypatch.setenv("CHATFORGE_KERNELS", "auto")
    lib, why = native._load_installed(frozenset())
    assert lib is None and "installed generic unusable" in why


@pytest.mark.slow  # subprocesses, compiles or a model load
def test_models_info_shows_the_kernel_path(capsys, tiny_llama_dir: Path):
    code, out, err = run(["models", "info", str(tiny_llama_dir)], capsys)
    assert code == 0, err
    assert "LlamaForCausalLM" in out
    kernels = next(line for line in out.splitlines() if line.startswith("kernels"))
    assert native.kernel_path() in kernels
    for label in ("parameters", "context length", "prompt format", "dtype", "engine"):
        assert label in out


def test_an_installed_variant_built_from_other_sources_is_stale(monkeypatch):
    installed = native.installed_variants()
    if "generic" not in installed:
        pytest.skip("the generic variant is not installed here")
    monkeypatch.setenv("CHATFORGE_KERNELS", "generic")
    assert native._load_installed(frozenset())[1] == "installed generic"
    monkeypatch.setattr(kv, "source_hash", lambda directory: "0123456789abcdef")
    lib, why = native._load_installed(frozenset())
    assert lib is None and "stale" in why


def test_bench_reports_the_kernel_path():
    from chatforge.bench.decode import BenchResult
    from chatforge.bench.report import machine

    assert machine()["kernels"] == native.kernel_path()
    assert "kernels" in BenchResult.__dataclass_fields__
