"""Grouped asymmetric (min-max) quantization: the statistics of round-to-nearest, GPTQ and SpQR."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.functional.absmax import Affine
from lowbit.functional.validate import check_float


def minmax_stats(w: torch.Tensor, bits: int, clip_search: bool = False,
                 scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric scale (rounded to ``scale_dtype``, as stored) and integer zero over a [rows, group] slice.

    ``clip_search``: shrink each row's range by the factor in 1.0, 0.95, ..., 0.5 that gives the least
    squared rounding error (the range search of the reference GPTQ code), instead of the plain min-max.
    """
    lo0 = w.amin(1).clamp(max=0)
    hi0 = w.amax(1).clamp(min=0)
    maxq = 2**bits - 1

    def stats(p: float) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((hi0 - lo0) * p / maxq).to(scale_dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.round(-lo0 * p / scale).clamp(0, maxq)

    scale, zero = stats(1.0)
    if not clip_search:
        return scale, zero
    best = ((w - grid_values(w, scale[:, None], zero[:, None], bits)) ** 2).sum(1)
    for p in torch.arange(0.95, 0.49, -0.05).tolist():
        s, z = stats(p)
        err = ((w - grid_values(w, s[:, None], z[:, None], bits)) ** 2).sum(1)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.where(better, err, best)
    return scale, zero


def grid_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` rounded to the nearest point of the grid (code - zero) * scale."""
    return (round_to_grid(w, scale, zero, bits) - zero) * scale


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` on the grid (code - zero) * scale."""
    # The zero is added before rounding: SpQR's zeros, dequantized from 3 bits, are not integers.
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1)


def quantize_stats(x: torch.Tensor, stat_bits: int, stat_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric ``stat_bits`` quantization of a per-row statistic [out] in blocks of ``stat_group`` rows."""
    rows = x.numel()
    pad = -rows % stat_group
    blocks = torch.nn.functional.pad(x, (0, pad), value=float(x[-1])).view(-1, stat_group)
    lo, hi = blocks.amin(1), blocks.amax(1)
    maxq = 2**stat_bits - 1
    scale = ((hi - lo) / maxq).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    lo = lo.half().float()
    codes = torch.clamp(torch.round((blocks - lo[:, None]) / scale[:, None]), 0, maxq)
    return codes.reshape(-1)[:rows].to(torch.uint8), scale, lo


def dequantize_stats(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, stat_group: int) -> torch.Tensor:
    """Inverse of quantize_stats along dim 0: codes [out] or [out, groups], scale and lo per block of rows."""
    idx = torch.arange(codes.shape[0]) // stat_group
    return codes.float() * scale[idx] + lo[idx]


@dataclass
class SpQRWeight:
    codes: torch.Tensor  # uint8 [out, in]; outlier positions hold the code of their stored value's neighbour
    stat_codes: torch.Tensor  # uint8 [2, out, groups]: 3-bit codes of the scales (0) and zeros (1)
    stat_scale: torch.Tensor  # float32 [2, row_blocks, groups]: second-level scale of scales / zeros
    stat_zero: torch.Tensor  # float32 [2, row_blocks, groups]: second-level zero point
    outliers: torch.Tensor  # bool [out, in]
    values: torch.Tensor  # float32 [out, in]: the exact (fp16-rounded) weight where ``outliers``


def quantize_affine(x: torch.Tensor, bits: int, group_size: int | None = None, clip_search: bool = False,
                    scale_dtype: torch.dtype = torch.float32) -> Affine:
    """Zero-point intN (N = 2..8) of a 2-D tensor in groups of ``group_size`` columns (None: whole rows): min-max
    statistics per group (``minmax_stats``, the scale rounded to ``scale_dtype``), each value to the nearest code.
    The one affine quantizer: round-to-nearest layers and GPTQ's groups take their codes the same way."""
    check_float(x)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if x.dim() != 2:
        raise ValueError(f"quantize_affine takes a 2-D tensor, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    group_size = cols if group_size is None else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    w = x.float()
    groups = -(-cols // group_size)
    scale, zero = torch.empty(rows, groups), torch.empty(rows, groups)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    for g in range(groups):
        part = slice(g * group_size, (g + 1) * group_size)
        scale[:, g], zero[:, g] = minmax_stats(w[:, part], bits, clip_search, scale_dtype)
        codes[:, part] = round_to_grid(w[:, part], scale[:, g:g + 1], zero[:, g:g + 1], bits).to(torch.uint8)
    return Affine(codes, scale, zero, bits, group_size)
