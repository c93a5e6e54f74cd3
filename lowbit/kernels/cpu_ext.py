"""Loads lowbit's C++ CPU kernels: the builds ``pip install`` made (setup.py), one per instruction-set variant.

The builds never use ``-march=native``: each variant is compiled for a named set of features and loaded only on
a CPU that has them, so an installed build moved to another machine is either valid there or not chosen. Using
lowbit never compiles: without an installed build (no compiler at install) lowbit warns once and runs the
plain-torch reference path; ``lowbit doctor --build`` can still compile one into the cache.
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType

from lowbit.cache import cache_dir
from lowbit.kernels import cpu
from lowbit.kernels.variants import BASE_FLAGS as _BASE_FLAGS, CSRC, SOURCES, X86, digest, module_name, variants

PATHS = ("auto", *X86, "reference")  # what LOWBIT_KERNELS may name
_SOURCES = [CSRC / name for name in SOURCES]


def supported(variant: str) -> bool:
    """Whether this CPU can run the ``variant`` build."""
    table = variants()
    return variant in table and cpu.has(*table[variant][1])


def best_variant() -> str:
    """The fastest build this CPU runs."""
    return next(name for name in variants() if supported(name))


def _build_name(variant: str) -> str:
    # Keyed on the sources, the target and the flags only: the build does not depend on the CPU that compiles it.
    return f"lowbit_cpu_{variant}_{digest(variant)}"


def installed(variant: str) -> tuple[ModuleType | None, str]:
    """(the build ``pip install`` made of ``variant``, or None; why not)."""
    try:
        module = importlib.import_module(module_name(variant))
    except ImportError as e:
        return None, f"not installed ({e})"
    if module.compiled_isa() != variant:
        return None, f"the installed build reports ISA {module.compiled_isa()!r}"
    if module.source_digest() != digest(variant):
        return None, "the installed build is from other sources (reinstall: bash scripts/setup.sh)"
    return module, "installed"


def _cached(variant: str) -> bool:
    name = _build_name(variant)
    return (cache_dir() / "ext" / name / f"{name}.so").exists()


def status(variant: str) -> str:
    """"installed", "built in the cache (lowbit doctor --build)" or why there is no build of ``variant``."""
    module, why = installed(variant)
    if module is not None:
        return "installed"
    return "built in the cache (lowbit doctor --build)" if _cached(variant) else why


def is_built(variant: str) -> bool:
    """Whether a build of ``variant`` is there to load (installed, or compiled into the cache)."""
    return installed(variant)[0] is not None or _cached(variant)


@lru_cache(maxsize=None)
def load(variant: str | None = None, build: bool = False) -> ModuleType | None:
    """The compiled kernels of ``variant`` (default: the best this CPU runs): the installed build, else one in the
    cache; None (with one warning) where there is neither. ``build`` compiles one into the cache (about a minute)."""
    variant = variant or best_variant()
    if not supported(variant):
        raise RuntimeError(f"lowbit: the {variant!r} kernels need CPU features {variants().get(variant, ((), ()))[1]}; "
                           f"this CPU: {cpu.describe()}")
    if os.environ.get("LOWBIT_NO_EXT"):
        return None
    module, why = installed(variant)
    if module is not None:
        return module
    if not (build or _cached(variant)):
        warnings.warn(f"lowbit: no compiled {variant} kernels ({why}); running on the plain-torch reference path, "
                      "several times slower. Build them with bash scripts/setup.sh, or pip install "
                      "--no-build-isolation . (needs a C++ compiler)", RuntimeWarning, stacklevel=3)
        return None
    return _jit(variant)


def _jit(variant: str) -> ModuleType | None:
    name = _build_name(variant)
    build_dir = cache_dir() / "ext" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.cpp_extension import load as load_extension

        module = load_extension(name=name, sources=[str(s) for s in _SOURCES],
                                extra_cflags=_BASE_FLAGS + variants()[variant][0], extra_ldflags=["-fopenmp"],
                                build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure falls back to plain torch
        warnings.warn(f"lowbit: C++ kernels ({variant}) could not be built ({type(exc).__name__}: {str(exc)[:200]}); "
                      "using the slower plain-torch reference path", RuntimeWarning, stacklevel=3)
        return None
    if module.compiled_isa() != variant:  # the flags did not produce the code they name
        raise RuntimeError(f"lowbit: the {variant} build reports ISA {module.compiled_isa()!r}")
    return module
