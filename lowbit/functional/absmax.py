"""Absmax (symmetric) and zero-point (asymmetric) integer quantization, per tensor, row, column or group."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit import kernels
from lowbit.kernels import reference
from lowbit.functional.validate import as_float32, check_finite_stats, check_float

INT8_MAX = 127.0


def quantize_absmax(x: torch.Tensor, dim: int | None = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes round(x * 127 / absmax) and the float32 absmax: per tensor (dim=None) or per vector
    along ``dim`` (dim=-1: one scale per row, as LLM.int8() quantizes activations and weight rows)."""
    check_float(x, finite=False)
    if dim is None:
        absmax, codes = _rowwise(as_float32(x).reshape(1, -1))
        return codes.reshape(x.shape), absmax.reshape(())
    if x.dim() == 0:
        raise ValueError("per-vector quantization needs at least one dimension")
    moved = as_float32(x).movedim(dim, -1)
    absmax, codes = _rowwise(moved.reshape(-1, moved.shape[-1]).contiguous())
    return codes.reshape(moved.shape).movedim(-1, dim), absmax.reshape(moved.shape[:-1])


def _rowwise(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ext = kernels.fast()
    codes, absmax = ext.quantize_rowwise_int8(x2d) if ext is not None else reference.quantize_rowwise_int8(x2d)
    check_finite_stats(absmax)
    return absmax, codes


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8()'s outlier feature dimensions of a 2-D input: the columns (ascending, int64) holding any |x| >=
    ``threshold`` in any row (bitsandbytes' rule, which it applies to fp16(x): docs/int8.md); none where threshold is 0."""
    if threshold <= 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    return (x.abs() >= threshold).any(dim=0).nonzero().squeeze(1)


def quantize_zeropoint_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row zero-point int8 of a 2-D tensor, as LLM.int8()'s asymmetric variant quantizes activations: x ~
    (codes + shift) * scale, codes int8, scale float32 [rows], shift int32 [rows] (128 minus the uint8 zero point).

    The step (max(row, 0) - min(row, 0)) / 255 is never coarser than absmax's absmax / 127: a row's values use all
    256 levels, not the half of them on one side of zero."""
    check_float(x, finite=False)
    if x.dim() != 2:
        raise ValueError(f"quantize_zeropoint_rows takes a 2-D tensor, got shape {tuple(x.shape)}")
    x = as_float32(x).contiguous()
    ext = kernels.fast()
    fn = ext.quantize_rowwise_zeropoint if ext is not None else reference.quantize_rowwise_zeropoint
    codes, scale, shift, absmax = fn(x)
    check_finite_stats(absmax)
    return codes, scale, shift


def dequantize_absmax(
    codes: torch.Tensor, absmax: torch.Tensor, dim: int | None = -1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_absmax: codes * absmax / 127, with absmax broadcast along ``dim``."""
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8, got {codes.dtype}")
    if dim is None:
        if absmax.numel() != 1:
            raise ValueError(f"per-tensor dequantization takes one absmax, got {absmax.numel()}")
        scale = absmax.reshape(())
    else:
        expected = codes.movedim(dim, -1).shape[:-1]
        if absmax.shape != expected:
            raise ValueError(f"absmax has shape {tuple(absmax.shape)}; codes {tuple(codes.shape)} need {tuple(expected)}")
        scale = absmax.unsqueeze(dim)
    return (codes.float() * (scale.float() / INT8_MAX)).to(dtype)


@dataclass
class Affine:
    """Asymmetric integer quantization: x ~ (codes - zero) * scale, one scale/zero per group."""

    codes: torch.Tensor  # uint8 in [0, 2^bits - 1], shape [rows, cols]
    scale: torch.Tensor  # float32 [rows, groups]
    zero: torch.Tensor  # float32 [rows, groups], integer-valued
    bits: int
    group_size: int


def dequantize_affine(q: Affine, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``functional.grouped.quantize_affine``: (codes - zero) * scale."""
    rows, cols = q.codes.shape
    groups = q.scale.shape[1]
    if q.scale.shape != (rows, -(-cols // q.group_size)) or q.zero.shape != q.scale.shape:
        raise ValueError(f"scale/zero of shape {tuple(q.scale.shape)} do not fit codes {tuple(q.codes.shape)}")
    pad = groups * q.group_size - cols
    c = torch.nn.functional.pad(q.codes.float(), (0, pad)).view(rows, groups, q.group_size)
    out = (c - q.zero.unsqueeze(2)) * q.scale.unsqueeze(2)
    return out.reshape(rows, -1)[:, :cols].to(dtype)
