"""Builds and loads lowbit's C++ CPU kernels on first use, one build per instruction-set variant.

The builds never use ``-march=native``: each variant is compiled for a named set of features and loaded only on
a CPU that has them, so a cached or installed build moved to another machine is either valid there or not chosen.
"""
from __future__ import annotations

import hashlib
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from lowbit.cache import cache_dir
from lowbit.kernels import cpu

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("quant.cpp", "matmul.cpp", "bindings.cpp")]
# -fopenmp: at::parallel_for is an inline OpenMP region, serial without it.
_BASE_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
_AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
_AVX512_FEATURES = ("avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq")

# name -> (compiler flags, CPU features it needs), best first. "scalar" is plain C++ for any CPU.
_X86_VARIANTS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "avx512_vnni": (_AVX512 + ["-mavx512vnni"], _AVX512_FEATURES + ("avx512_vnni",)),
    "avx512": (_AVX512, _AVX512_FEATURES),
    "scalar": ([], ()),
}
PATHS = ("auto", *_X86_VARIANTS, "reference")  # what LOWBIT_KERNELS may name


def variants() -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """The kernel builds this machine's architecture has, best first."""
    return _X86_VARIANTS if platform.machine() in ("x86_64", "AMD64") else {"scalar": ([], ())}


def supported(variant: str) -> bool:
    """Whether this CPU can run the ``variant`` build."""
    table = variants()
    return variant in table and cpu.has(*table[variant][1])


def best_variant() -> str:
    """The fastest build this CPU runs."""
    return next(name for name in variants() if supported(name))


def _build_name(variant: str) -> str:
    digest = hashlib.sha256()
    for src in _SOURCES:
        digest.update(src.read_bytes())
    # Keyed on the sources, the target and the flags only: the build does not depend on the CPU that compiles it.
    digest.update(f"{platform.machine()} {_BASE_FLAGS} {variants()[variant][0]}".encode())
    return f"lowbit_cpu_{variant}_{digest.hexdigest()[:12]}"


def is_built(variant: str) -> bool:
    """Whether ``variant`` is already compiled in the cache (loading it then takes a second, not a minute)."""
    name = _build_name(variant)
    return (cache_dir() / "ext" / name / f"{name}.so").exists()


@lru_cache(maxsize=None)
def load(variant: str | None = None) -> ModuleType | None:
    """The compiled kernels of ``variant`` (default: the best this CPU runs), built on first use (about a minute)."""
    variant = variant or best_variant()
    if not supported(variant):
        raise RuntimeError(f"lowbit: the {variant!r} kernels need CPU features {variants().get(variant, ((), ()))[1]}; "
                           f"this CPU: {cpu.describe()}")
    if os.environ.get("LOWBIT_NO_EXT"):
        return None
    name = _build_name(variant)
    build_dir = cache_dir() / "ext" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.cpp_extension import load as load_extension

        module = load_extension(
            name=name,
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_BASE_FLAGS + variants()[variant][0],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure falls back to plain torch
        warnings.warn(
            f"lowbit: C++ kernels ({variant}) could not be built ({type(exc).__name__}: {str(exc)[:200]}); "
            "using the slower plain-torch reference path",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    if module.compiled_isa() != variant:  # the flags did not produce the code they name
        raise RuntimeError(f"lowbit: the {variant} build reports ISA {module.compiled_isa()!r}")
    return module
