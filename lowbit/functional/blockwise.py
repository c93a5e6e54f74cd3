"""Blockwise quantization: per-block absmax scaling onto any codebook, 4-bit packing, double quant."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit import kernels
from lowbit.formats.codebooks import codebook, midpoints_sorted
from lowbit.kernels import reference
from lowbit.functional import fixed_order
from lowbit.functional.validate import as_float32, check_blocksize, check_finite_stats, check_float

FOUR_BIT_TYPES = ("nf4", "fp4")
DOUBLE_QUANT_BLOCKSIZE = 256


@dataclass
class NestedAbsmax:
    """Block constants quantized a second time (QLoRA's double quantization)."""

    codes: torch.Tensor  # uint8, one per first-level block
    absmax: torch.Tensor  # float32, one per DOUBLE_QUANT_BLOCKSIZE first-level blocks
    offset: torch.Tensor  # float32 scalar: the mean subtracted before quantizing
    code: torch.Tensor  # the signed dynamic 8-bit map
    blocksize: int = DOUBLE_QUANT_BLOCKSIZE


@dataclass
class Blockwise:
    """A tensor quantized blockwise: codes, per-block absmax (plain or nested) and how to read them."""

    codes: torch.Tensor  # uint8: two 4-bit codes a byte when bits == 4, else one code a byte
    absmax: torch.Tensor | None  # float32 per block, None when ``nested`` holds it
    code: torch.Tensor  # float32 codebook
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    quant_type: str = "custom"
    nested: NestedAbsmax | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def block_absmax(self) -> torch.Tensor:
        """The float32 per-block absmax, dequantized first when nested."""
        return dequantize_nested(self.nested) if self.nested is not None else self.absmax


def _codebook(code: str | torch.Tensor) -> torch.Tensor:
    if isinstance(code, str):
        return codebook(code)
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not 2 <= code.numel() <= 256:
        raise ValueError("a codebook must be a 1-D tensor of 2..256 values")
    c = code.float().contiguous()
    if not bool(torch.isfinite(c).all()) or float(c.abs().max()) > 1.0:
        raise ValueError("codebook values must be finite and lie in [-1, 1]")
    return c


def quantize_blockwise(x: torch.Tensor, code: str | torch.Tensor = "dynamic", blocksize: int = 256) -> Blockwise:
    """Quantize x to one 8-bit code per element: nearest entry of a sorted codebook times block absmax."""
    check_float(x, finite=False)
    check_blocksize(blocksize)
    c = _codebook(code)
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError("quantize_blockwise needs a codebook sorted ascending")
    xf = as_float32(x).reshape(-1)
    ext = kernels.fast()
    if ext is not None:
        absmax = torch.empty(-(-xf.numel() // blocksize), dtype=torch.float32)
        codes = ext.quantize_blockwise(xf, blocksize, c, absmax)
    else:
        codes, absmax = reference.quantize_blockwise(xf, blocksize, c)
    check_finite_stats(absmax)
    name = code if isinstance(code, str) else "custom"
    return Blockwise(codes, absmax, c, blocksize, x.shape, x.dtype, bits=8, quant_type=name)


def _check_state(q: Blockwise) -> None:
    n, nblocks = q.numel, -(-q.numel // q.blocksize)
    want = -(-n // 2) if q.bits == 4 else n
    if q.codes.dtype != torch.uint8 or q.codes.numel() != want:
        raise ValueError(
            f"codes hold {q.codes.numel()} {q.codes.dtype} values; shape {tuple(q.shape)} at {q.bits} bits needs {want} uint8"
        )
    stats = q.nested.codes if q.nested is not None else q.absmax
    if stats is None or stats.numel() != nblocks:
        got = None if stats is None else stats.numel()
        raise ValueError(f"{got} block scales for {n} values in blocks of {q.blocksize}: need {nblocks}")
    if q.nested is not None and q.nested.absmax.numel() != -(-nblocks // q.nested.blocksize):
        raise ValueError("double-quantized scales do not match the number of blocks")


def _out(q: Blockwise, dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
    dtype = dtype or q.dtype
    if out is None:
        return torch.empty(q.shape, dtype=dtype)
    if out.shape != q.shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(q.shape)}")
    return out


def dequantize_blockwise(q: Blockwise, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize a Blockwise (8-bit or packed 4-bit) back to a float tensor of its shape."""
    if q.bits == 4:
        return dequantize_4bit(q, dtype, out)
    _check_state(q)
    absmax = q.block_absmax()
    result = _out(q, dtype, out)
    ext = kernels.fast()
    if ext is not None:
        ext.dequantize_blockwise(q.codes.reshape(-1), absmax, q.code, q.blocksize, result.view(-1))
        return result
    result.view(-1).copy_(reference.dequantize_blockwise(q.codes, absmax, q.code, q.blocksize, result.dtype))
    return result


def double_quantize(absmax: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE) -> NestedAbsmax:
    """Quantize block constants to 8 bits (dynamic map, blocks of 256) after subtracting their mean."""
    offset = fixed_order.mean(absmax)  # not absmax.mean(): its last bit changes with the thread count
    inner = quantize_blockwise(absmax - offset, "dynamic", blocksize)
    return NestedAbsmax(inner.codes, inner.absmax, offset, inner.code, blocksize)


def dequantize_nested(nested: NestedAbsmax) -> torch.Tensor:
    """The float32 block constants a NestedAbsmax stands for."""
    n = nested.codes.numel()
    inner = Blockwise(nested.codes, nested.absmax, nested.code, nested.blocksize, torch.Size([n]), torch.float32, 8)
    return dequantize_blockwise(inner) + nested.offset


def quantize_4bit(
    x: torch.Tensor, quant_type: str | torch.Tensor = "nf4", blocksize: int = 64, double_quant: bool = False
) -> Blockwise:
    """Quantize x blockwise to a 16-entry codebook (nf4, fp4 or custom), codes packed two a byte."""
    check_float(x, finite=False)
    check_blocksize(blocksize, even=True)
    if isinstance(quant_type, str) and quant_type not in FOUR_BIT_TYPES:
        raise ValueError(f"quant_type must be one of {FOUR_BIT_TYPES} or a 16-value tensor, got {quant_type!r}")
    c = _codebook(quant_type)
    if c.numel() != 16:
        raise ValueError(f"a 4-bit codebook has 16 values, got {c.numel()}")
    midpoints, order = midpoints_sorted(c)
    xf = as_float32(x).reshape(-1)
    ext = kernels.fast()
    if ext is not None:
        packed, absmax = ext.quantize_4bit(xf, blocksize, midpoints, order.to(torch.uint8))
    else:
        packed, absmax = reference.quantize_4bit(xf, blocksize, midpoints, order)
    check_finite_stats(absmax)
    name = quant_type if isinstance(quant_type, str) else "custom"
    q = Blockwise(packed, absmax, c, blocksize, x.shape, x.dtype, bits=4, quant_type=name)
    if double_quant:
        q.nested, q.absmax = double_quantize(absmax), None
    return q


def dequantize_4bit(q: Blockwise, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize a packed 4-bit Blockwise to a float tensor of its shape."""
    _check_state(q)
    check_blocksize(q.blocksize, even=True)
    absmax = q.block_absmax()
    result = _out(q, dtype, out)
    ext = kernels.fast()
    if ext is not None:
        ext.dequantize_4bit(q.codes.reshape(-1), absmax, q.code, q.numel, q.blocksize, result.view(-1))
        return result
    result.view(-1).copy_(reference.dequantize_4bit(q.codes, absmax, q.code, q.numel, q.blocksize, result.dtype))
    return result
