"""Matmul with low-bit weights: the compiled CPU kernels where they apply, else the plain-torch reference.

Decode (a few rows of x) runs fused GEMV kernels that read the packed weight once; prefill dequantizes
cache-sized tiles of rows and multiplies them with torch's GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import fast, reference

GEMV_MAX_ROWS = 8  # up to this many rows of x, the fused GEMV beats dequantize + GEMM
TILE_BYTES = 1 << 20  # one dequantized tile of rows: about an L2 cache


@dataclass
class LutWeight:
    """A [N, K] weight of ``bits``-bit codes: lut[code] * scale[block] - scale[block] * zero[block] per row block.

    ``scale`` is float32 or float16 [N, groups], or the uint8 codes of double quantization (then
    ``nested_absmax``, ``nested_table``, ``offset``, ``nested_block`` decode it); ``zero`` is None, float32 or uint8.
    """

    packed: torch.Tensor
    N: int
    K: int
    bits: int
    lut: torch.Tensor
    block: int
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_table: torch.Tensor | None = None
    offset: float = 0.0
    nested_block: int = 256

    def args(self) -> tuple:
        return (self.packed, self.N, self.K, self.bits, self.lut, self.block, self.scale, self.zero,
                self.nested_absmax, self.nested_table, float(self.offset), self.nested_block)

    def fits_kernel(self) -> bool:
        """Whether the compiled kernels take this layout (rows on byte boundaries, blocks whole lanes)."""
        lane = 32 // self.bits
        chunk = 16 * lane
        return (self.bits in (2, 4) and self.K * self.bits % 8 == 0 and self.block % lane == 0
                and (chunk % self.block == 0 or self.block % chunk == 0))


def lut_linear(x: torch.Tensor, w: LutWeight, compute_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ W^T in float32 out, on the kernels when they apply."""
    ext = fast()
    if ext is None or not w.fits_kernel():
        return reference.lut_linear(x, w, compute_dtype)
    if x.shape[0] <= GEMV_MAX_ROWS:
        return ext.lut_gemv(x.float(), *w.args())
    # Prefill: x in the kernel's lane order meets tiles of W dequantized in that same order.
    xp = ext.lut_permute_x(x.float(), w.bits).to(compute_dtype)
    kp = xp.shape[1]
    rows = max(16, TILE_BYTES // (kp * xp.element_size()) // 16 * 16)
    tile = torch.empty(rows, kp, dtype=compute_dtype)
    y = torch.empty(w.N, x.shape[0], dtype=compute_dtype)  # y^T: each tile fills whole rows
    for r0 in range(0, w.N, rows):
        r1 = min(r0 + rows, w.N)
        ext.lut_dequant_rows(*w.args(), r0, r1, tile)
        torch.mm(tile[:r1 - r0], xp.t(), out=y[r0:r1])
    return y.t().float()


def int8_linear(x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ (codes * row_scale[:, None])^T for int8 codes (weight-only int8), float32 out."""
    ext = fast()
    if ext is not None and x.shape[0] <= GEMV_MAX_ROWS:
        return ext.int8_gemv(x.float(), codes, row_scale.float())
    # The per-row scale commutes with the matmul: scale the outputs, not the weight.
    return (torch.nn.functional.linear(x.to(compute_dtype), codes.to(compute_dtype)) * row_scale.to(compute_dtype)).float()


def int8_int8(xq: torch.Tensor, codes: torch.Tensor, code_sums: torch.Tensor) -> torch.Tensor:
    """Exact int32 xq [M, K] @ codes [N, K]^T for int8 operands."""
    ext = fast()
    if ext is not None and xq.shape[0] <= GEMV_MAX_ROWS:
        return ext.int8_int8_gemv(xq, codes, code_sums)
    return torch._int_mm(xq, codes.t())


def ternary_int8(xq: torch.Tensor, packed: torch.Tensor, N: int, trits) -> torch.Tensor:
    """Exact int32 xq [M, K] @ T^T for ternary T packed 2 bits a weight; ``trits()`` unpacks T for other paths."""
    ext = fast()
    if ext is not None and xq.shape[0] <= GEMV_MAX_ROWS and xq.shape[1] % 4 == 0:
        return ext.ternary_gemv(xq, packed, N)
    return torch._int_mm(xq, trits().t())
