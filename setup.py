"""Builds lowbit's C++ CPU kernels at install, as torch C++ extensions tied to the installed torch.

One extension per instruction-set build this CPU runs (LOWBIT_BUILD_KERNELS=all: every build of the architecture,
=none: none). Builds are optional: on a machine without a compiler the install still succeeds, and lowbit warns once
and runs its plain-torch reference path. torch must be importable while building: install with
``pip install --no-build-isolation`` (the README's commands do) so that the build uses the pinned CPU torch.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _variants_module():
    spec = importlib.util.spec_from_file_location("lowbit_kernel_variants", ROOT / "lowbit" / "kernels" / "variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _extensions():
    choice = os.environ.get("LOWBIT_BUILD_KERNELS", "cpu").lower()
    if choice == "none":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("lowbit: torch is not importable in this build environment, so the C++ kernels are not built "
              "(install with pip install --no-build-isolation)", file=sys.stderr)
        return [], {}
    v = _variants_module()
    flags = _cpu_flags()
    exts = []
    for name, (cflags, needs) in v.variants().items():
        if choice != "all" and not set(needs) <= flags:
            continue
        exts.append(CppExtension(
            v.module_name(name), [f"lowbit/kernels/csrc/{s}" for s in v.SOURCES],
            extra_compile_args=v.BASE_FLAGS + cflags + [f'-DLOWBIT_SOURCE_DIGEST="{v.digest(name)}"'],
            extra_link_args=["-fopenmp"], optional=True))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
