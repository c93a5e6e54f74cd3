"""Kernel selection: the compiled CPU kernels when they build, else the plain-torch reference."""
from __future__ import annotations

from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

from lowbit.kernels import cpu_ext

_force_reference = False


def fast() -> ModuleType | None:
    """The compiled kernel module, or None when the reference path must be used."""
    return None if _force_reference else cpu_ext.load()


@contextmanager
def reference_only() -> Iterator[None]:
    """Run the enclosed code on the plain-torch reference kernels (for tests and comparisons)."""
    global _force_reference
    saved, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = saved
