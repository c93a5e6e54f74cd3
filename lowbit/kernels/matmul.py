"""Matmul with low-bit weights: the compiled CPU kernels where they apply, else the plain-torch reference.

Decode (a few rows of x) runs fused GEMV kernels that read the packed weight once; prefill dequantizes
cache-sized tiles of rows and multiplies them with torch's GEMM.
"""
from __future__ import annotations

from typing import Callable

import torch

from lowbit.kernels import fast, float32_gemm_dtype, gemm_path, reference
from lowbit.kernels.layouts import LutLayout

GEMV_MAX_ROWS = 8  # up to this many rows of x, the fused GEMV beats dequantize + GEMM
TILE_BYTES = 1 << 20  # one dequantized tile of rows: about an L2 cache


def gemm_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of prefill GEMMs: bf16 for bf16 compute where the CPU multiplies bf16 natively (or where forced,
    see ``lowbit.kernels``), else fp32 (3-4x faster than emulated bf16); float32 compute in bf16 inside
    ``lowbit.kernels.fast_prefill()`` where ``prefill_path()`` says so."""
    if compute_dtype != torch.bfloat16:
        return torch.bfloat16 if compute_dtype == torch.float32 and float32_gemm_dtype() else torch.float32
    return torch.bfloat16 if gemm_path() == "bf16" else torch.float32


def tiled_matmul(x: torch.Tensor, n: int, fill: Callable[[int, int, torch.Tensor], None], k: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """y [M, n] = x [M, k] @ W^T, W made one tile of rows at a time by ``fill(r0, r1, tile)`` (about an L2 cache
    each), so that the full weight is never materialized."""
    rows = max(16, TILE_BYTES // (k * torch.empty((), dtype=dtype).element_size()) // 16 * 16)
    tile = torch.empty(min(rows, n), k, dtype=dtype)
    # Row-major out, filled a block of columns per tile: as fast as filling y^T, and a transposed view would push
    # later ops (attention, norms) onto their slow strided paths.
    y = torch.empty(x.shape[0], n, dtype=x.dtype if dtype.is_floating_point else torch.int32)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        fill(r0, r1, tile)
        if dtype == torch.int8:
            y[:, r0:r1] = torch._int_mm(x, tile[:r1 - r0].t())
        else:
            torch.mm(x, tile[:r1 - r0].t(), out=y[:, r0:r1])
    return y


def _few_rows(x: torch.Tensor, k: int) -> bool:
    # a decode step's input: a few float32 rows of width k, no autograd
    return x.dtype is torch.float32 and x.numel() <= GEMV_MAX_ROWS * k and not x.requires_grad


def few_rows_call(gemv: Callable[[torch.Tensor], torch.Tensor], k: int, n: int, bias: torch.Tensor | None,
                  fallback: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x @ W^T (+ bias) through ``gemv(float32 [rows, k]) -> float32 [rows, n]`` for a few float32 rows without
    autograd (a decode step), else ``fallback(x)``. Each torch call costs 1-2 us against 10-30 us for a small
    layer's kernel, so the few-rows path makes as few as it can."""
    def call(x: torch.Tensor) -> torch.Tensor:
        if not _few_rows(x, k):
            return fallback(x)
        y = gemv(x.reshape(-1, k))
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], n)
    return call


def few_rows_many(ext, plans: list, k: int, biases: list, fallbacks: list) -> Callable[[torch.Tensor], list]:
    """x -> [x @ W_i^T (+ bias_i)] for LUT plans sharing K, in one kernel call for a few float32 rows without
    autograd (q, k and v of a decode step: one parallel region instead of three), else each ``fallbacks[i](x)``.
    Each output equals that plan's own GEMV: the rows are the same sums."""
    def call(x: torch.Tensor) -> list:
        if not _few_rows(x, k):
            return [f(x) for f in fallbacks]
        ys = ext.lut_gemv_many(plans, x.reshape(-1, k))
        for y, bias in zip(ys, biases):
            if bias is not None:
                y += bias
        return [y.view(*x.shape[:-1], y.shape[1]) for y in ys]
    return call


def cpu_kernels(x: torch.Tensor):
    """The compiled kernels for a CPU tensor, else None (other devices take the reference path)."""
    return fast() if x.device.type == "cpu" else None


def bf16_dot(ext, w: LutLayout, compute_dtype: torch.dtype) -> bool:
    """Whether ``w``'s GEMVs take the bf16-dot kernel: bf16 compute, 4- or 2-bit codes, and a build that has it (CPUs
    with AVX512_BF16). x and the code table are then rounded to bf16 and summed in float32, as bitsandbytes' fused
    CPU kernel does; elsewhere bf16-compute GEMVs run in float32."""
    return compute_dtype == torch.bfloat16 and w.bits in (2, 4) and ext.bf16_dot


def lut_plan(ext, w: LutLayout, compute_dtype: torch.dtype):
    """``w`` bound once: ``plan.gemv(x)`` is its GEMV (float32 x, a few rows), with the checks taken here, and
    ``ext.lut_gemv_many(plans, x)`` runs several plans of one K in one call."""
    return w.plan(ext, bf16_dot(ext, w, compute_dtype))


def lut_linear(x: torch.Tensor, w: LutLayout, compute_dtype: torch.dtype,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) in float32 out, on the kernels when they apply."""
    ext = cpu_kernels(x)
    if ext is None or not w.fits_kernel():
        return reference.lut_linear(x, w, compute_dtype, bias)
    if x.shape[0] <= GEMV_MAX_ROWS:
        y = lut_plan(ext, w, compute_dtype).gemv(x.float())
    else:  # prefill: x in the kernel's lane order meets tiles of W dequantized in that same order
        dtype = gemm_dtype(compute_dtype)
        xp = ext.lut_permute_x(x.float(), w.bits).to(dtype)
        plan = w.plan(ext)
        y = tiled_matmul(xp, w.N, lambda r0, r1, tile: plan.dequant_rows(r0, r1, tile), xp.shape[1], dtype).float()
    return y if bias is None else y + bias.float()


def int8_linear(x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ (codes * row_scale[:, None])^T for int8 codes (weight-only int8), float32 out."""
    ext = cpu_kernels(x)
    if ext is not None and x.shape[0] <= GEMV_MAX_ROWS:
        return ext.int8_gemv(x.float(), codes, row_scale.float())
    if x.device.type != "cpu":
        return (torch.nn.functional.linear(x.to(compute_dtype), codes.to(compute_dtype)) * row_scale.to(compute_dtype)).float()
    dtype = gemm_dtype(compute_dtype)
    # The per-row scale commutes with the matmul: scale the outputs, not the weight.
    y = tiled_matmul(x.to(dtype), codes.shape[0], lambda r0, r1, tile: tile[:r1 - r0].copy_(codes[r0:r1]),
                     codes.shape[1], dtype)
    return (y * row_scale.to(dtype)).float()


def int8_int8(xq: torch.Tensor, codes: torch.Tensor, code_sums: torch.Tensor) -> torch.Tensor:
    """Exact int32 xq [M, K] @ codes [N, K]^T for int8 operands."""
    ext = cpu_kernels(xq)
    if ext is not None and xq.shape[0] <= GEMV_MAX_ROWS:
        return ext.int8_int8_gemv(xq, codes, code_sums)
    return torch._int_mm(xq, codes.t())


def q8_gemv(x: torch.Tensor, weight: torch.Tensor, code_sums: torch.Tensor | None, row_scale: torch.Tensor,
            threshold: float, n: int, zero_point: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """Per-token int8 x (absmax, or ``zero_point`` for int8 weights) times int8 codes [n, K] (LLM.int8, outlier
    columns |x| >= threshold in float) or packed ternary weights, for a few float32 rows of x in one compiled call:
    (y float32, x's row absmax, whether it is finite), or None where the torch-op path must run."""
    ext = cpu_kernels(x)
    ternary = weight.dtype == torch.uint8
    if ext is None or x.dtype != torch.float32 or x.shape[0] > GEMV_MAX_ROWS or (ternary and x.shape[1] % 4):
        return None
    return ext.q8_gemv(x, weight, code_sums, row_scale, threshold, n, zero_point)


def ternary_int8(xq: torch.Tensor, packed: torch.Tensor, N: int, trits) -> torch.Tensor:
    """Exact int32 xq [M, K] @ T^T for ternary T packed 2 bits a weight; ``trits()`` unpacks T for other paths."""
    ext = cpu_kernels(xq)
    k = xq.shape[1]
    if ext is None or k % 4:
        return torch._int_mm(xq, trits().t())
    if xq.shape[0] <= GEMV_MAX_ROWS:
        return ext.ternary_gemv(xq, packed, N)
    return tiled_matmul(xq, N, lambda r0, r1, tile: ext.ternary_unpack_rows(packed, k, r0, r1, tile), k, torch.int8)
