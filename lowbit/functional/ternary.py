"""BitNet b1.58 (Ma et al., 2024): absmean ternary weights and per-token absmax 8-bit activations."""
from __future__ import annotations

import torch

from lowbit import kernels
from lowbit.formats.packing import unpack_ternary_2bit
from lowbit.functional import fixed_order
from lowbit.functional.absmax import dequantize_absmax, quantize_absmax
from lowbit.functional.validate import as_float32, check_finite_stats, check_float
from lowbit.kernels import reference

ABSMEAN_EPS = 1e-5


def quantize_ternary(w: torch.Tensor, eps: float = ABSMEAN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weights of b1.58: gamma = mean|w|, trits = clamp(round(w / (gamma + eps)), -1, 1).
    Returns (trits packed 2 bits each as uint8, gamma as float32 scalar); w ~ trits * gamma."""
    check_float(w, finite=False)
    wf = as_float32(w).reshape(-1)
    gamma = fixed_order.mean_abs(wf)  # NaN or Inf when w holds any; the same at any thread count
    check_finite_stats(gamma)
    divisor = float(gamma) + eps
    ext = kernels.fast()
    packed = ext.quantize_ternary_2bit(wf, divisor) if ext is not None else reference.quantize_ternary_2bit(wf, divisor)
    return packed, gamma


def dequantize_ternary(
    packed: torch.Tensor, gamma: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_ternary: trits * gamma in ``shape``."""
    n = 1
    for s in shape:
        n *= s
    trits = unpack_ternary_2bit(packed, n)
    return (trits.float() * gamma.float()).reshape(shape).to(dtype)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 activations of b1.58 (one scale per row of the last dim)."""
    return quantize_absmax(x, dim=-1)


def dequantize_activations_int8(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_activations_int8."""
    return dequantize_absmax(codes, absmax, dim=-1, dtype=dtype)
