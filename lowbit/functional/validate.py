"""Input checks shared by every primitive: clear errors instead of silent wrong results."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(x: torch.Tensor, name: str = "input", finite: bool = True) -> None:
    """Raise TypeError unless x is a non-empty fp32/fp16/bf16 tensor; ValueError on NaN/Inf if ``finite``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: there is nothing to quantize")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; quantization would silently corrupt it")


def check_blocksize(blocksize: int, even: bool = False) -> None:
    """Raise ValueError unless blocksize is a positive int (and even, for packed 4-bit codes)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if even and blocksize % 2:
        raise ValueError(f"4-bit blocksize must be even (two codes share a byte), got {blocksize}")


def check_finite_stats(absmax: torch.Tensor, name: str = "input") -> None:
    """Raise ValueError when a block statistic came out NaN/Inf (the input held NaN or Inf)."""
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"{name} contains NaN or Inf; quantization would silently corrupt it")


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """Contiguous float32 view or copy of x."""
    return x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
