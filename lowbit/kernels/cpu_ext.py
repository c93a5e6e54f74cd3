"""Builds and loads lowbit's C++ CPU kernels on first use; None where they cannot be built."""
from __future__ import annotations

import hashlib
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from lowbit.cache import cache_dir

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("quant.cpp", "matmul.cpp", "bindings.cpp")]
# -fopenmp: at::parallel_for is an inline OpenMP region, serial without it.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]


def _build_name() -> str:
    digest = hashlib.sha256()
    for src in _SOURCES:
        digest.update(src.read_bytes())
    # -march=native code is only valid where it was built: key the build on the machine too.
    digest.update(platform.machine().encode())
    digest.update(repr(_FLAGS).encode())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        digest.update(flags.encode())
    except OSError:
        pass
    return "lowbit_cpu_" + digest.hexdigest()[:12]


@lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """Return the compiled kernel module, building it (about 30 s, once) if needed."""
    if os.environ.get("LOWBIT_NO_EXT"):
        return None
    name = _build_name()
    build_dir = cache_dir() / "ext" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.cpp_extension import load as load_extension

        return load_extension(
            name=name,
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure falls back to plain torch
        warnings.warn(
            f"lowbit: C++ kernels could not be built ({type(exc).__name__}: {str(exc)[:200]}); "
            "using the slower plain-torch reference path",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
