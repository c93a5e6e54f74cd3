"""Bits-per-parameter accounting: every stored code and constant counted, nothing rounded away."""
from __future__ import annotations

import math

FORMATS = ("fp32", "bf16", "fp16", "int8", "int8-weight", "nf4", "fp4", "int4", "intN", "ternary", "ternary-base3", "blockwise8")


def bits_per_param(
    fmt: str,
    shape: tuple[int, ...] = (4096, 4096),
    blocksize: int = 64,
    double_quant: bool = False,
    bits: int = 4,
    group_size: int = 64,
) -> float:
    """Exact bits per parameter of a [out, in] weight stored in ``fmt``, constants included.

    nf4/fp4: 4-bit codes + one fp32 absmax per block; with double_quant an 8-bit code per block plus
    one fp32 absmax per 256 blocks and one fp32 offset. int8/int8-weight: 8-bit codes + one fp32
    absmax per output row. int4/intN: ``bits``-bit codes + fp32 scale and fp32 zero per group along
    the input dim (zero kept as float). ternary: 2 bits a weight + one fp32 scale; ternary-base3:
    8 bits per 5 weights + one fp32 scale. blockwise8: 8-bit codes + fp32 absmax per block.
    """
    n = math.prod(shape)
    if n <= 0:
        raise ValueError(f"shape must have positive size, got {shape}")
    rows = shape[0]
    cols = n // rows
    if fmt in ("fp32",):
        total = 32 * n
    elif fmt in ("bf16", "fp16"):
        total = 16 * n
    elif fmt in ("int8", "int8-weight"):
        total = 8 * n + 32 * rows
    elif fmt in ("nf4", "fp4", "blockwise8"):
        code_bits = 8 if fmt == "blockwise8" else 4
        nblocks = -(-n // blocksize)
        codes = code_bits * n if code_bits == 8 else 8 * -(-n // 2)
        if double_quant:
            stats = 8 * nblocks + 32 * -(-nblocks // 256) + 32
        else:
            stats = 32 * nblocks
        total = codes + stats
    elif fmt in ("int4", "intN"):
        b = 4 if fmt == "int4" else bits
        groups = rows * -(-cols // group_size)
        total = b * n + 64 * groups
    elif fmt == "ternary":
        total = 8 * -(-n // 4) + 32
    elif fmt == "ternary-base3":
        total = 8 * -(-n // 5) + 32
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return total / n
