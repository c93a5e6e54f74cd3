"""What this CPU can do: its model name and the instruction-set features that choose lowbit's paths."""
from __future__ import annotations

import platform
from functools import lru_cache

# The features that decide a path somewhere: lowbit's kernel variant (AVX-512 F/BW, VNNI), its bf16 prefill
# GEMMs (AVX512_BF16 / AMX), and bitsandbytes' fused 4-bit CPU kernel (AVX512_BF16).
DECIDING = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
            "amx_tile", "amx_bf16", "amx_int8")


@lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first processor's entries describe them all
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    """The CPU's model name as the OS reports it."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo names; empty where unknown)."""
    return _cpuinfo()[1]


def has(*features: str) -> bool:
    """Whether the CPU has every one of ``features``."""
    return set(features) <= cpu_flags()


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512_BF16 or AMX), so bf16 GEMMs beat fp32 ones."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def describe() -> str:
    """One line: the CPU model and which of the deciding features it has."""
    feats = " ".join(f for f in DECIDING if f in cpu_flags())
    return f"{cpu_model()} ({platform.machine()}); features: {feats or 'none of the deciding ones'}"
