"""The kernel builds: sources, compiler flags and the CPU features each build needs.

Plain data and the standard library only: setup.py reads this file (by path, before lowbit is importable) to build
the kernels at install, and ``lowbit.kernels.cpu_ext`` reads it to load them.
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("quant.cpp", "matmul.cpp", "engine.cpp", "bindings.cpp")
# -fopenmp: at::parallel_for is an inline OpenMP region, serial without it.
BASE_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
_AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
_AVX512_FEATURES = ("avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq")

# name -> (compiler flags, CPU features it needs), best first. "scalar" is plain C++ for any CPU.
X86 = {
    "avx512_bf16": (_AVX512 + ["-mavx512vnni", "-mavx512bf16"], _AVX512_FEATURES + ("avx512_vnni", "avx512_bf16")),
    "avx512_vnni": (_AVX512 + ["-mavx512vnni"], _AVX512_FEATURES + ("avx512_vnni",)),
    "avx512": (_AVX512, _AVX512_FEATURES),
    "scalar": ([], ()),
}


def variants() -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """The kernel builds this machine's architecture has, best first."""
    return X86 if platform.machine() in ("x86_64", "AMD64") else {"scalar": ([], ())}


def digest(variant: str) -> str:
    """What a build of ``variant`` is made of (sources, target, flags): a build whose digest differs is stale."""
    h = hashlib.sha256()
    for path in sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")):  # sources and their headers
        h.update(path.read_bytes())
    # The CPU that compiles is not part of it: no build assumes that CPU.
    h.update(f"{platform.machine()} {BASE_FLAGS} {variants()[variant][0]}".encode())
    return h.hexdigest()[:12]


def module_name(variant: str) -> str:
    """The installed extension module of ``variant``."""
    return f"lowbit.kernels._cpu_{variant}"
