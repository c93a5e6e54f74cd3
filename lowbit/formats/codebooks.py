"""Codebooks: the exact values each low-bit number format can represent.

Every blockwise format stores an index into a codebook plus a scale (the block's absmax);
the value it stands for is ``codebook[index] * absmax``.
"""
from __future__ import annotations

from functools import lru_cache

import torch

# NF4, the 4-bit NormalFloat of QLoRA (Dettmers et al., 2023, appendix E): quantiles of N(0, 1)
# rescaled to [-1, 1], asymmetric so that 0 is exact (7 negative, 8 positive values).
# These are the float32 values bitsandbytes ships, so codes and dequantized values match bit for bit.
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 as bitsandbytes defines it: 1 sign bit (the high bit of the nibble), 2 exponent bits with
# bias 2, 1 mantissa bit. Magnitudes for the low 3 bits 000..111 are 0, 0.0625, 8, 12, 4, 6, 2, 3,
# divided by 12 (the largest) so the range is [-1, 1]. Listed in code (bit-pattern) order.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_VALUES: tuple[float, ...] = tuple(m / 12.0 for m in _FP4_MAGNITUDES) + tuple(
    -m / 12.0 for m in _FP4_MAGNITUDES
)

TERNARY_VALUES: tuple[float, ...] = (-1.0, 0.0, 1.0)


@lru_cache(maxsize=None)
def _cached(name: str) -> torch.Tensor:
    with torch.device("cpu"):  # built once, real data even when first asked for under a meta-device context
        return _build(name)


def _build(name: str) -> torch.Tensor:
    if name == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if name == "fp4":
        return torch.tensor(FP4_VALUES, dtype=torch.float32)
    if name == "dynamic":
        return _dynamic_map(signed=True)
    if name == "dynamic_unsigned":
        return _dynamic_map(signed=False)
    raise ValueError(f"unknown codebook {name!r}; known: nf4, fp4, dynamic, dynamic_unsigned")


def codebook(name: str) -> torch.Tensor:
    """Return the float32 codebook called ``name`` (nf4, fp4, dynamic, dynamic_unsigned); a copy."""
    return _cached(name).clone()


def _dynamic_map(signed: bool) -> torch.Tensor:
    """Dynamic 8-bit map of the 8-bit optimizers (Dettmers et al., 2022, "8-bit Optimizers via
    Block-wise Quantization"): a decimal exponent 10^-6 .. 10^0 marked by leading zero bits, and the
    remaining bits a linear fraction in [0.1, 1]. Returns 256 sorted float32 values in [-1, 1]."""
    exponent_levels = 7
    fraction_bits = 7 if signed else 8  # the sign bit is free for magnitude in the unsigned map
    values: list[float] = []
    for level in range(exponent_levels):
        # Each larger exponent frees one more bit for the fraction.
        n_fraction = 2 ** (level + fraction_bits - exponent_levels) + 1
        edges = torch.linspace(0.1, 1.0, n_fraction, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10.0 ** (level - (exponent_levels - 1))
        # Scaled in float32, as the published map was built, so every value is bit-identical.
        values += (magnitude * centres).tolist()
        if signed:
            values += (-magnitude * centres).tolist()
    values += [0.0, 1.0]  # 254 + 2 = 256 codes in both layouts
    return torch.tensor(sorted(values), dtype=torch.float32)


def int_grid(bits: int, signed: bool = True) -> torch.Tensor:
    """Integer levels of an N-bit format: symmetric signed is [-(2^(N-1)-1), 2^(N-1)-1], else [0, 2^N-1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if signed:
        top = 2 ** (bits - 1) - 1
        return torch.arange(-top, top + 1, dtype=torch.float32)
    return torch.arange(0, 2**bits, dtype=torch.float32)


def midpoints_sorted(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort a codebook; return (midpoints between neighbours, the code index of each sorted entry)."""
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order
