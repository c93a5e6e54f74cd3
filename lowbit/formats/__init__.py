"""Number formats: codebooks and bit packing."""
from lowbit.formats.codebooks import (
    FP4_VALUES,
    NF4_VALUES,
    TERNARY_VALUES,
    codebook,
    int_grid,
    midpoints_sorted,
)
from lowbit.formats.packing import (
    pack_2bit,
    pack_3bit,
    pack_4bit,
    pack_ternary_2bit,
    pack_ternary_base3,
    ternary_2bit_valid,
    unpack_2bit,
    unpack_3bit,
    unpack_4bit,
    unpack_ternary_2bit,
    unpack_ternary_base3,
)

__all__ = [
    "FP4_VALUES", "NF4_VALUES", "TERNARY_VALUES", "codebook", "int_grid", "midpoints_sorted",
    "pack_2bit", "pack_3bit", "pack_4bit", "pack_ternary_2bit", "pack_ternary_base3", "ternary_2bit_valid",
    "unpack_2bit", "unpack_3bit", "unpack_4bit", "unpack_ternary_2bit", "unpack_ternary_base3",
]
