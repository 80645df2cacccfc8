"""Builds chatforge's C kernels when the package is installed (wheel or ``pip install -e .``).

Everything else about the package is in pyproject.toml. The kernels
(``src/chatforge/models/fast/kernels/*.c``) are built as several variants of one
shared library, one per instruction set (see ``kernel_variants.py``), each as an
optional extension: a variant that does not build prints a warning and the
install goes on. They are plain C libraries loaded with ctypes (no Python
module init), so they are compiled and linked here directly rather than with
setuptools' Python-extension defaults.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
FAST = Path("src/chatforge/models/fast")


def _variants_module():
    """``kernel_variants.py``, loaded by path (the package is not importable yet)."""
    spec = importlib.util.spec_from_file_location(
        "_cf_kernel_variants", FAST / "kernel_variants.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kv = _variants_module()


def _warn(message: str) -> None:
    print(f"warning: chatforge: {message}", file=sys.stderr)


class BuildKernels(build_ext):
    """Builds each kernel variant as a plain shared library; failures only warn."""

    def finalize_options(self) -> None:
        """Build the variants in parallel unless told otherwise (``-j``)."""
        super().finalize_options()
        if self.parallel is None:
            self.parallel = min(len(self.extensions or ()), os.cpu_count() or 1) or None

    def build_extension(self, ext: Extension) -> None:
        """Compile and link one variant, retrying without OpenMP; never raise."""
        flags = list(ext.extra_compile_args)
        for flag in (f for f in flags if f in kv.PROBED):
            if not self._accepts(flag):
                _warn(f"the compiler does not take {flag}; {ext.name} not built")
                return
        attempts = [flags, [f for f in flags if f != kv.OPENMP]] if kv.OPENMP in flags else [flags]
        errors = []
        for attempt in attempts:
            try:
                self._build(ext, attempt)
                return
            # Broad on purpose: the compiler errors' classes moved between setuptools
            # releases, and no failure of an optional variant may fail the install.
            except Exception as e:
                errors.append(str(e))
        _warn(f"the {ext.name} kernels were not built ({errors[-1]}); other variants remain")

    def _build(self, ext: Extension, flags: list[str]) -> None:
        """Compile ``ext``'s sources with ``flags`` into its own temp dir, then link."""
        out = self.get_ext_fullpath(ext.name)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        link = ["-fopenmp"] if kv.OPENMP in flags else []
        with tempfile.TemporaryDirectory(dir=self._temp_root()) as tmp:
            stamp = Path(tmp) / "cf_source_hash.c"  # lets the loader spot a stale build
            stamp.write_text(kv.stamp_source(FAST))
            objects = self.compiler.compile(
                [*ext.sources, str(stamp)],
                output_dir=tmp,
                extra_postargs=flags,
                depends=ext.depends,
            )
            self.compiler.link_shared_object(
                objects, out, libraries=["m"], extra_postargs=link, target_lang="c"
            )

    def _accepts(self, flag: str) -> bool:
        """True when the C compiler compiles an empty function with ``flag``."""
        with tempfile.TemporaryDirectory(dir=self._temp_root()) as tmp:
            src = Path(tmp) / "probe.c"
            src.write_text("int cf_probe(void) { return 0; }\n")
            try:
                self.compiler.compile([str(src)], output_dir=tmp, extra_postargs=[flag])
            except Exception:  # any compiler error class: see build_extension
                return False
        return True

    def _temp_root(self) -> str:
        Path(self.build_temp).mkdir(parents=True, exist_ok=True)
        return self.build_temp

    def get_export_symbols(self, ext: Extension) -> list[str]:
        """No ``PyInit_*``: these libraries are loaded with ctypes, never imported."""
        return []


def _target_machine() -> str:
    """The machine the build is for: this one, or a cross build's (its host platform,
    e.g. ``_PYTHON_HOST_PLATFORM=linux-aarch64`` as crossenv and cibuildwheel set)."""
    host = os.environ.get("_PYTHON_HOST_PLATFORM", "")
    return host.rsplit("-", 1)[-1] if host else platform.machine()


def _extensions() -> list[Extension]:
    """One optional extension per kernel variant this platform can build."""
    if os.name == "nt" or os.environ.get("CHATFORGE_BUILD_KERNELS", "1") == "0":
        return []
    sources = [str(FAST / s) for s in kv.SOURCES]
    depends = [str(FAST / h) for h in kv.HEADERS]
    exts = []
    for v in kv.VARIANTS:  # x86's on x86, aarch64's (NEON) on aarch64, generic everywhere
        if v.arch not in (None, kv.arch(_target_machine())):
            continue
        flags = [*v.flags, kv.OPENMP, "-g0"]
        exts.append(
            Extension(v.module, sources, depends=depends, extra_compile_args=flags, optional=True)
        )
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildKernels})
