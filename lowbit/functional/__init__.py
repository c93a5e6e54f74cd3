"""Quantize / dequantize primitives: vector-wise absmax, zero-point intN, blockwise k-bit, double quant, ternary."""
from lowbit.functional.absmax import (
    Affine,
    dequantize_absmax,
    dequantize_affine,
    outlier_columns,
    quantize_absmax,
    quantize_zeropoint_rows,
)
from lowbit.functional.bits import bits_per_param
from lowbit.functional.grouped import quantize_affine
from lowbit.functional.blockwise import (
    Blockwise,
    NestedAbsmax,
    dequantize_4bit,
    dequantize_blockwise,
    dequantize_nested,
    double_quantize,
    quantize_4bit,
    quantize_blockwise,
)
from lowbit.functional.ternary import (
    dequantize_activations_int8,
    dequantize_ternary,
    quantize_activations_int8,
    quantize_ternary,
)

__all__ = [
    "Affine", "Blockwise", "NestedAbsmax", "bits_per_param",
    "quantize_absmax", "dequantize_absmax", "quantize_affine", "dequantize_affine", "quantize_zeropoint_rows",
    "outlier_columns",
    "quantize_blockwise", "dequantize_blockwise", "quantize_4bit", "dequantize_4bit",
    "double_quantize", "dequantize_nested",
    "quantize_ternary", "dequantize_ternary", "quantize_activations_int8", "dequantize_activations_int8",
]
