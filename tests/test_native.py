"""Our C kernels: quantised linears against a float reference, the plain-C build
against the vector build, the C decode step against the torch one, and the
fallback to torch's kernels when the C ones cannot be had."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from chatforge.models.fast import build_fast_model, kernel_variants, native
from chatforge.models.fast.linear import Int4Linear, Int8Linear, repack_q4, repack_q8
from test_fast import Driver, _randomise_biases, _tiny

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler here")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def q8_0(w: torch.Tensor, b: torch.Tensor | None) -> Int8Linear:
    """``w`` as Q8_0 blocks (llama.cpp's rounding: d = amax / 127 per 32 inputs, fp16),
    taken as they are (kind 8)."""
    n, k = w.shape
    blocks = w.view(n, k // 32, 32)
    d = (blocks.abs().amax(-1) / 127).half()  # (N, K/32)
    q = torch.round(blocks / d.float().clamp(min=1e-12)[..., None]).clamp(-127, 127)
    return Int8Linear.from_blocks(q.to(torch.int8).view(n, k), d, b)


LAYERS = [Int8Linear, Int4Linear, q8_0]  # kinds 9, 5, 8


@needs_native
@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("rows", [1, 3, 4, 7])
def test_quantised_linear_matches_its_dequantised_weight(cls, rows):
    torch.manual_seed(0)
    n, k = 37, 96  # 37: a leftover weight row after the groups of 4 / 2
    w, b = torch.randn(n, k), torch.randn(n)
    lin = cls(w, b)
    assert lin.native
    deq = lin.dequantize()
    # The dequantised weight is the original within one quantisation step.
    if cls is Int4Linear:
        step = (w.amax() - w.amin()) / 15
    elif cls is q8_0:
        step = w.view(n, 3, 32).abs().amax(-1, keepdim=True).expand(n, 3, 32).reshape(n, k) / 127
    else:
        step = w.abs().amax(1, keepdim=True) / 127
    # (Q8_0's scale is fp16: 127 * d's rounding adds up to ~0.06 of a step.)
    assert ((deq - w).abs() <= step * (0.6 if cls is q8_0 else 0.51) + 1e-6).all()
    x = torch.randn(rows, k)
    ref = x @ deq.T + b
    got = lin(x)
    assert got.shape == (rows, n)
    # The activations are rounded to ~2^-15 of each block's largest (qlinear.c): ~4e-5.
    assert _rel(got, ref) < 2e-4
    # Long inputs (a prompt) run on the same kernel: each row as it would alone.
    xl = torch.cat([x, torch.randn(500, k)])
    assert torch.equal(lin(xl)[:rows], got)


def _variants() -> dict:
    """The installed kernel variants this CPU runs, by name."""
    runs = {v.name for v in kernel_variants.runnable(kernel_variants.cpu_flags())}
    return {k: p for k, p in native.installed_variants().items() if k in runs}


def _cf_qlinear(lib, lin, x: torch.Tensor, threads: int = 2) -> torch.Tensor:
    """``x`` (M, K) times ``lin``'s repacked weight through ``lib``."""
    y = torch.empty(x.shape[0], lin.out_features)
    rc = lib.cf_qlinear(
        lin.kind, x.data_ptr(), x.shape[0], x.shape[1], lin.weight_q.data_ptr(),
        lin.scales.data_ptr(), lin.bias.data_ptr(), lin.out_features, y.data_ptr(), threads,
    )  # fmt: skip
    assert rc == 0
    return y


@needs_native
@pytest.mark.parametrize("cls", LAYERS)
def test_every_variant_computes_the_reference_and_is_batch_invariant(cls):
    """The integer kernels (kinds 9, 5, 8) of every variant this CPU runs, against the
    dequantised weight in fp32; a row's output is bit-identical whatever the number of
    rows, the other rows, the threads or the variant."""
    libs = _variants()
    if not libs:
        pytest.skip("no installed kernel variant this CPU runs (pip install -e . builds them)")
    torch.manual_seed(3)
    n, k = 37, 160  # 37: two groups of 16 rows and a partial one; 5 blocks of 32
    w, b = torch.randn(n, k), torch.randn(n)
    lin = cls(w, b)
    deq = lin.dequantize()
    x = torch.randn(47, k) * torch.rand(47, 1) * 10  # rows of different sizes
    x[0, :32] *= 100  # an outlier block
    ref = x @ deq.T + b
    first = None
    for name, path in libs.items():
        lib = native.load_library(path, name)
        full = _cf_qlinear(lib, lin, x)
        assert _rel(full, ref) < 2e-4, name  # activations rounded to ~2^-15 of a block
        for m in (1, 3, 32, 47):
            assert torch.equal(_cf_qlinear(lib, lin, x[:m]), full[:m]), (name, m)
        assert torch.equal(_cf_qlinear(lib, lin, x, threads=1), full), name
        other = torch.cat([x[:1], torch.randn(31, k)])
        assert torch.equal(_cf_qlinear(lib, lin, other)[0], full[0]), name
        if first is None:
            first = full
        assert torch.equal(full, first), name  # the same operations in every variant


def test_repacking_moves_the_blocks_and_keeps_their_values():
    """kind 5 / kind 9 layouts: a weight's value survives the repacking (dequantize reads
    it back from the interleaved groups), and padding rows are zeros."""
    torch.manual_seed(4)
    q = torch.randint(0, 256, (20, 48), dtype=torch.uint8)  # (N, K/2): K = 96
    scales = torch.randn(20, 2, 3).half()
    rq, rs = repack_q4(q, scales)
    assert rq.shape == (2, 3, 4, 16, 4) and rs.shape == (2, 3, 2, 16)
    # row 17, block 2, byte 4c + i = 6 (c 1, i 2) is at group 1, row 1 of the group
    assert rq[1, 2, 1, 1, 2] == q[17, 2 * 16 + 6]
    assert rs[1, 2, 1, 1] == scales[17, 1, 2]
    assert (rq[1, :, :, 4:] == 0).all() and (rs[1, :, :, 4:] == 0).all()
    q8 = torch.randint(-128, 128, (5, 64), dtype=torch.int8)
    r8 = repack_q8(q8)
    assert r8.shape == (1, 2, 8, 16, 4)
    assert int(r8[0, 1, 3, 4, 1]) == int(q8[4, 32 + 13]) + 128


@needs_native
def test_plain_c_build_computes_what_the_vector_build_does(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    so = tmp_path / "plain.so"
    srcs = [str(p) for p in native.SOURCES]
    subprocess.run([cc, "-O2", "-shared", "-fPIC", *srcs, "-o", str(so), "-lm"], check=True)
    import ctypes

    plain = ctypes.CDLL(str(so))
    assert plain.cf_has_avx2() == 0
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    plain.cf_qlinear.argtypes = [ctypes.c_int, p, i64, i64, p, p, p, i64, p, ctypes.c_int]
    torch.manual_seed(1)
    w = torch.randn(20, 64)
    x = torch.randn(5, 64)
    for lin in (Int8Linear(w, None), Int4Linear(w, None), q8_0(w, None)):
        y = torch.empty(5, 20)
        rc = plain.cf_qlinear(
            lin.kind, x.data_ptr(), 5, 64, lin.weight_q.data_ptr(), lin.scales.data_ptr(),
            None, 20, y.data_ptr(), 1,
        )  # fmt: skip
        assert rc == 0
        assert torch.allclose(y, lin(x), atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_c_step_matches_the_torch_step(kind, quantize):
    """Three sequences prefilled and decoded together, C against torch (GQA with Q/K/V
    biases; GPT-2's LayerNorm, GELU and learned positions)."""
    model = _tiny(kind).eval()
    _randomise_biases(model)
    dec = build_fast_model(model, quantize=quantize)
    assert dec.native  # the C step runs this model
    ref = build_fast_model(model, quantize=quantize)
    ref.native = None  # the torch step
    drivers = Driver(dec), Driver(ref)
    torch.manual_seed(2)
    prompts = [(i, torch.randint(0, 300, (n,)).tolist()) for i, n in enumerate((5, 17, 9))]
    a, b = (d.feed(prompts) for d in drivers)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)
    for _ in range(12):
        tok = torch.randint(0, 300, (3,)).tolist()
        a, b = (d.feed([(i, [t]) for i, t in enumerate(tok)]) for d in drivers)
        for x, y in zip(a, b, strict=True):
            assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)


def test_without_the_c_kernels_torch_kernels_take_over():
    code = (
        "import torch\n"
        "from chatforge.models.fast import native\n"
        "from chatforge.models.fast.linear import Int8Linear, Int4Linear\n"
        "assert not native.available()\n"
        "torch.manual_seed(0)\n"
        "w = torch.randn(16, 64); x = torch.randn(2, 64)\n"
        "for cls, tol in ((Int8Linear, 0.02), (Int4Linear, 0.25)):\n"
        "    lin = cls(w, None)\n"
        "    assert not lin.native\n"
        "    ref = x @ w.T\n"
        "    assert float((lin(x) - ref).norm() / ref.norm()) < tol\n"
        "print('ok')\n"
    )
    env = {"CHATFORGE_NATIVE": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


@needs_native
def test_a_corrupt_cached_library_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("CHATFORGE_KERNELS", "compile")  # not the installed variants
    built = native._compile(tmp_path / "kernels")  # built, not loaded
    assert built is not None
    built.write_bytes(b"not a shared library")  # e.g. a disk that filled up
    native.kernels.cache_clear()
    try:
        assert native.kernels() is not None  # rebuilt, not a crash
        assert built.read_bytes()[:4] == b"\x7fELF"
    finally:
        native.kernels.cache_clear()
