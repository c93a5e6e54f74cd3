"""Plain-torch reference kernels: the definition each fast kernel must match (bit for bit where integer)."""
from __future__ import annotations

import torch

from lowbit.formats.packing import pack_4bit, pack_ternary_2bit, unpack_2bit, unpack_3bit, unpack_4bit
from lowbit.kernels.layouts import DoubleQuantLut, LutLayout, PlainLut, SpQRLut


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """Flat float32 x as rows of ``blocksize`` (zero-padded tail) and the element count."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize), n


def block_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block max |x| (zero padding never raises it); NaN/Inf propagate."""
    blocks, _ = _blocks(x, blocksize)
    return blocks.abs().amax(dim=1)


def quantize_4bit(
    x: torch.Tensor, blocksize: int, midpoints: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed 4-bit codes and per-block absmax (see csrc/quant.cpp for the rounding rule)."""
    blocks, n = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)[:n]
    codes = order[torch.bucketize(scaled, midpoints)]
    return pack_4bit(codes), absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Flat tensor of ``n`` values code[nibble] * absmax[block], cast to dtype."""
    values = code[unpack_4bit(packed, n).long()]
    padded = torch.nn.functional.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    return (padded * absmax.unsqueeze(1)).reshape(-1)[:n].to(dtype)


def quantize_blockwise(x: torch.Tensor, blocksize: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One uint8 code per element (nearest entry of the sorted codebook, ties low) and the block absmax."""
    blocks, n = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    normed = torch.where(absmax.unsqueeze(1) > 0, blocks / safe, torch.zeros_like(blocks)).reshape(-1)[:n]
    c = code
    idx = (torch.searchsorted(c, normed, right=True) - 1).clamp(0, c.numel() - 2)
    right_closer = (normed - c[idx + 1]).abs() < (normed - c[idx]).abs()
    return (idx + right_closer.long()).to(torch.uint8), absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Flat tensor code[q] * absmax[block], cast to dtype."""
    n = q.numel()
    values = code[q.reshape(-1).long()]
    padded = torch.nn.functional.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    return (padded * absmax.unsqueeze(1)).reshape(-1)[:n].to(dtype)


def quantize_rowwise_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes round(x * 127 / absmax) per row of a 2-D float32 tensor, and the row absmax."""
    absmax = x.abs().amax(dim=1)
    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    return torch.round(x * scale.unsqueeze(1)).to(torch.int8), absmax


def quantize_rowwise_zeropoint(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-point uint8 u = clamp(round(x * (1 / scale)) + zero, 0, 255) per row of a 2-D float32 tensor, stored as the
    int8 u - 128, with scale = (max(row, 0) - min(row, 0)) / 255 (1 where 0): (codes, scale, 128 - zero as int32,
    row absmax). Non-finite rows get zero codes, scale 1 and shift 0 (the caller raises on their absmax)."""
    absmax = x.abs().amax(dim=1)
    finite = torch.isfinite(absmax).unsqueeze(1)
    xf = torch.where(finite, x, torch.zeros_like(x))
    lo, hi = xf.amin(dim=1).clamp(max=0), xf.amax(dim=1).clamp(min=0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 255)
    u = torch.clamp(torch.round(xf * (1.0 / scale).unsqueeze(1)) + zero.unsqueeze(1), 0, 255)
    codes = torch.where(finite, u - 128, torch.zeros_like(u)).to(torch.int8)
    shift = torch.where(finite.squeeze(1), 128 - zero, torch.zeros_like(zero)).to(torch.int32)
    return codes, scale, shift, absmax


def quantize_ternary_2bit(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """Trits clamp(round(x / divisor), -1, 1), packed 2 bits each."""
    d = torch.tensor(divisor, dtype=torch.float32)
    trits = torch.clamp(torch.round(x.reshape(-1).float() / d), -1, 1).to(torch.int8)
    return pack_ternary_2bit(trits)


def _spqr_stats(w: SpQRLut) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scale and zero [N, groups] from SpQR's 3-bit codes and their second-level statistics."""
    groups = w.stat_scale.shape[-1]
    codes = unpack_3bit(w.stat_codes, 2 * w.N * groups).view(2, w.N, groups).float()
    rows = torch.arange(w.N) // w.stat_group
    scale, zero = (codes[i] * w.stat_scale[i].float()[rows] + w.stat_zero[i].float()[rows] for i in range(2))
    return torch.where(scale > 0, scale, torch.full_like(scale, 1e-8)), zero


def lut_dequantize(w: LutLayout) -> torch.Tensor:
    """The float32 [N, K] weight of a ``layouts`` layout: lut[code] * scale - scale * zero per row block."""
    codes = _codes(w)
    if isinstance(w, SpQRLut):
        scale, zero = _spqr_stats(w)
        out = (w.lut[codes] - zero.repeat_interleave(w.block, dim=1)[:, :w.K]) * scale.repeat_interleave(w.block, dim=1)[:, :w.K]
        if w.rowptr is not None:
            rows = torch.repeat_interleave(torch.arange(w.N), torch.diff(w.rowptr.long()))
            out[rows, w.cols.long()] = w.values.float()
        return out
    scale, scale_zero = lut_scale_zero(w)
    out = w.lut[codes] * scale
    return out if scale_zero is None else out - scale_zero


def _codes(w: LutLayout) -> torch.Tensor:
    return {4: unpack_4bit, 3: unpack_3bit, 2: unpack_2bit}[w.bits](w.packed, w.N * w.K).view(w.N, w.K).long()


def lut_scale_zero(w: PlainLut | DoubleQuantLut) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each weight's scale and scale * zero (None without zero points) [N, K] of a plain or double-quantized layout."""
    if isinstance(w, DoubleQuantLut):
        nested = w.nested_absmax.repeat_interleave(w.nested_block)[:w.codes.numel()]
        scale, zero = w.nested_table[w.codes.reshape(-1).long()] * nested + w.offset, None
    else:
        scale, zero = w.scale, w.zero
    scale = scale.float().reshape(w.N, -1)
    scale_zero = None if zero is None else scale * zero.float().reshape(w.N, -1)
    spread = [None if t is None else t.repeat_interleave(w.block, dim=1)[:, :w.K] for t in (scale, scale_zero)]
    return spread[0], spread[1]


def lut_linear(x: torch.Tensor, w: LutLayout, compute_dtype: torch.dtype,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) for a ``layouts`` layout, multiplied in compute_dtype, float32 out."""
    return dense_linear(x, lut_dequantize(w).to(compute_dtype), compute_dtype, bias)


def dense_linear(x: torch.Tensor, w: torch.Tensor, compute_dtype: torch.dtype,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w^T + bias in compute_dtype, float32 out. In float32 the bias goes into the same F.linear call, as in
    bitsandbytes' dequantizing path: where the BLAS fuses it into the GEMM, a separate add rounds differently (an
    AMD EPYC: 1.5e-5 apart), and the two libraries' outputs are equal only if they make the same call."""
    x = x.to(compute_dtype)
    if compute_dtype == torch.float32:
        return torch.nn.functional.linear(x, w, None if bias is None else bias.float())
    y = torch.nn.functional.linear(x, w).float()
    return y if bias is None else y + bias.float()


X_BLOCK = 8  # the int8-activation kernels quantize x per block of this many values (one lane of the kernel)


LO_SCALE = 254.0  # the second table's scale: a non-integral table is hi + lo / LO_SCALE


def int8_codebook(lut: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The values the int8-activation kernels use for a code table, and its multiplier m: the values themselves
    where they are integers in [-127, 127] (m = 1), else hi + lo / 254 with hi = round(m * lut), m = 127 / max|lut|,
    and lo = round(254 * (m * lut - hi)) (two integer tables, float32 arithmetic as the kernel's)."""
    most = float(lut.abs().max())
    exact = bool((lut == lut.round()).all()) and most <= 127
    one = torch.tensor(1.0, dtype=torch.float32)
    mult = one if exact or most == 0 else torch.tensor(127.0, dtype=torch.float32) / lut.abs().max().float()
    scaled = lut.float() * mult
    hi = torch.round(scaled)
    if exact:
        return hi.double(), float(mult)
    lo = torch.round((scaled - hi) * torch.tensor(LO_SCALE, dtype=torch.float32))
    return hi.double() + lo.double() / LO_SCALE, float(mult)


def quantize_x_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of float32 x [M, K] as int8 codes round(x / d) and d = max|x| / 127 per block of ``X_BLOCK`` (d and the
    codes 0 where a block is all 0), d repeated over each block's values: (codes [M, K], d [M, K]), both float32."""
    m, k = x.shape
    blocks = torch.nn.functional.pad(x.float(), (0, -k % X_BLOCK)).view(m, -1, X_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(blocks))
    d = d.expand_as(blocks)
    return codes.reshape(m, -1)[:, :k], d.reshape(m, -1)[:, :k]


def lut_linear_int8x(x: torch.Tensor, w: PlainLut | DoubleQuantLut) -> torch.Tensor:
    """x [M, K] @ W^T as the int8-activation kernels compute it, in float64: x quantized per block
    (``quantize_x_int8``), the codes' values from ``int8_codebook``, the zero-point term with float x."""
    table, mult = int8_codebook(w.lut)
    scale, scale_zero = lut_scale_zero(w)
    xq, d = quantize_x_int8(x)
    y = (xq.double() * d.double()) @ (table[_codes(w)].double() * scale.double() / mult).t()
    return y if scale_zero is None else y - x.double() @ scale_zero.double().t()
