"""Kernel selection: which compiled build (or the plain-torch reference) runs, and the dtype of prefill GEMMs.

Both follow the CPU's features by default, and each can be forced on any machine (tests run every path):

    LOWBIT_KERNELS=auto | avx512_bf16 | avx512_vnni | avx512 | scalar | reference   (a build this CPU cannot run is an error)
    LOWBIT_GEMM=auto | bf16 | fp32      (prefill GEMMs of bf16-compute layers: bf16 even where the CPU emulates it)
    LOWBIT_PREFILL=auto | bf16 | exact  (the prompt's GEMMs of float32-compute quantized layers in lowbit's decoder)

or ``with lowbit.kernels.force(kernels="scalar", gemm="bf16"): ...``.

The prompt of ``lowbit.generate`` runs inside ``fast_prefill()``: there, on CPUs that multiply bf16 in hardware
(AVX512_BF16 or AMX), quantized layers that compute in float32 multiply their dequantized weight tiles and the
activations in bf16, 2.2x faster GEMMs, at a measured perplexity cost (docs/speed.md). Everywhere else (a layer's
forward, perplexity, training) the GEMMs of float32 layers stay float32; ``LOWBIT_PREFILL=exact`` keeps them so in
the decoder too.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from types import ModuleType
from typing import Iterator

from lowbit.kernels import cpu, cpu_ext

GEMM_PATHS = ("auto", "bf16", "fp32")
PREFILL_PATHS = ("auto", "bf16", "exact")
_forced: dict[str, str | None] = {"kernels": None, "gemm": None}
# Per thread and task: another thread's perplexity or training stays float32 while one runs a prompt.
_prefill: ContextVar[bool] = ContextVar("lowbit_fast_prefill", default=False)


def _choice(kind: str, env: str) -> str:
    return _forced[kind] or os.environ.get(env, "").strip().lower() or "auto"


# The choices are read on every layer call: resolve each (choice, CPU features) pair once.
@lru_cache(maxsize=None)
def _resolve_kernels(choice: str, flags: frozenset[str]) -> str:
    if choice not in cpu_ext.PATHS:
        raise ValueError(f"LOWBIT_KERNELS={choice!r}: expected one of {', '.join(cpu_ext.PATHS)}")
    if choice == "auto":
        return cpu_ext.best_variant()
    if choice != "reference" and not cpu_ext.supported(choice):
        raise RuntimeError(f"LOWBIT_KERNELS={choice}: this CPU cannot run that build ({cpu.describe()})")
    return choice


@lru_cache(maxsize=None)
def _resolve_gemm(choice: str, flags: frozenset[str]) -> str:
    if choice not in GEMM_PATHS:
        raise ValueError(f"LOWBIT_GEMM={choice!r}: expected one of {', '.join(GEMM_PATHS)}")
    if choice == "auto":  # bf16 only where the CPU multiplies it natively: emulated bf16 is 3-4x slower than fp32
        return "bf16" if cpu.native_bf16() else "fp32"
    return choice


@lru_cache(maxsize=None)
def _resolve_prefill(choice: str, flags: frozenset[str]) -> str:
    if choice not in PREFILL_PATHS:
        raise ValueError(f"LOWBIT_PREFILL={choice!r}: expected one of {', '.join(PREFILL_PATHS)}")
    if choice == "auto":
        return "bf16" if cpu.native_bf16() else "exact"
    return choice


def prefill_path() -> str:
    """The dtype of float32-compute layers' GEMMs inside ``fast_prefill()``: "bf16" or "exact" (float32)."""
    return _resolve_prefill(os.environ.get("LOWBIT_PREFILL", "").strip().lower() or "auto", cpu.cpu_flags())


@contextmanager
def fast_prefill() -> Iterator[None]:
    """Within: float32-compute quantized layers run their many-row GEMMs as ``prefill_path()`` says."""
    token = _prefill.set(True)
    try:
        yield
    finally:
        _prefill.reset(token)


def float32_gemm_dtype():
    """bf16 inside ``fast_prefill()`` where ``prefill_path()`` is bf16, else None (float32)."""
    return "bf16" if _prefill.get() and prefill_path() == "bf16" else None


def kernel_path() -> str:
    """The kernels that run: a compiled variant's name, or "reference" for the plain-torch path."""
    return _resolve_kernels(_choice("kernels", "LOWBIT_KERNELS"), cpu.cpu_flags())


def gemm_path() -> str:
    """The dtype of prefill GEMMs for bf16-compute layers: "bf16" or "fp32"."""
    return _resolve_gemm(_choice("gemm", "LOWBIT_GEMM"), cpu.cpu_flags())


def fast() -> ModuleType | None:
    """The compiled kernel module of the chosen path, or None when the reference path must be used."""
    path = kernel_path()
    return None if path == "reference" else cpu_ext.load(path)


@contextmanager
def force(kernels: str | None = None, gemm: str | None = None) -> Iterator[None]:
    """Run the enclosed code on the named kernel path and/or prefill GEMM dtype (None: leave as chosen)."""
    if kernels is not None and kernels not in cpu_ext.PATHS:
        raise ValueError(f"kernels={kernels!r}: expected one of {', '.join(cpu_ext.PATHS)}")
    if gemm is not None and gemm not in GEMM_PATHS:
        raise ValueError(f"gemm={gemm!r}: expected one of {', '.join(GEMM_PATHS)}")
    saved = dict(_forced)
    _forced.update({k: v for k, v in (("kernels", kernels), ("gemm", gemm)) if v is not None})
    try:
        yield
    finally:
        _forced.update(saved)


def reference_only():
    """Run the enclosed code on the plain-torch reference kernels (for tests and comparisons)."""
    return force(kernels="reference")


def describe() -> str:
    """One line: the paths that run on this machine now."""
    return (f"kernels {kernel_path()}, bf16 prefill GEMMs in {gemm_path()}, float32 layers' prompt GEMMs in lowbit's "
            f"decoder {prefill_path()}")
