"""The LUT weight layouts the compiled kernels multiply: one typed builder per family.

Every layout is a [N, K] weight of ``bits``-bit codes whose value is lut[code] * scale - scale * zero, with one scale
(and zero) per block of ``block`` codes of a row. The families differ in where scale and zero come from:

- ``PlainLut``: float32 or float16 scales per block, zeros (float32 or uint8) or none: NF4/FP4 absmax, int2/3/4
  groups, GPTQ, GGUF Q4_0/Q4_1.
- ``DoubleQuantLut``: NF4/FP4 with double quantization: each block's absmax is a uint8 code decoded as
  nested_table[code] * nested_absmax[block / nested_block] + offset.
- ``SpQRLut``: scales and zeros are 3-bit codes decoded per row with float16 second-level statistics over blocks of
  ``stat_group`` rows; a few outlier weights (CSR, float16) replace their coded ones.

``layout.plan(ext, bf16_dot)`` binds one to the compiled kernels (``ext.LutPlan``): a GEMV, rows dequantized for
prefill, the native decode step. A new format with one of these layouts touches only its layer's ``lut_weight()``;
a new layout family adds one class here and one builder in csrc/matmul.cpp.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch


@dataclass(frozen=True)
class LutLayout:
    """What every layout has: the packed codes [N rows of K codes], their value table (16 float32) and block."""

    packed: torch.Tensor
    N: int
    K: int
    bits: int
    lut: torch.Tensor
    block: int

    def lane(self) -> int:
        """Codes in one 32-bit lane of the kernels (3-bit: one 24-bit word)."""
        return 8 if self.bits == 3 else 32 // self.bits

    def fits_kernel(self) -> bool:
        """Whether the compiled kernels take this layout (rows on word boundaries, blocks whole lanes)."""
        lane = self.lane()
        chunk = 16 * lane
        row_start = self.K * self.bits % 8 == 0 and (self.bits != 3 or self.K % 8 == 0)
        return (self.bits in (2, 3, 4) and row_start and self.block % lane == 0
                and (chunk % self.block == 0 or self.block % chunk == 0))

    def plan(self, ext: ModuleType, bf16_dot: bool = False) -> Any:
        """This weight bound to the compiled kernels ``ext`` (their checks run here): an ``ext.LutPlan``."""
        raise NotImplementedError


@dataclass(frozen=True)
class PlainLut(LutLayout):
    """Scales float32 or float16 [N, groups]; zeros float32 or uint8 [N, groups], or None."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None

    def plan(self, ext: ModuleType, bf16_dot: bool = False) -> Any:
        return ext.LutPlan.plain(bf16_dot, self.packed, self.N, self.K, self.bits, self.lut, self.block, self.scale,
                                 self.zero)


@dataclass(frozen=True)
class DoubleQuantLut(LutLayout):
    """Each block's absmax as a uint8 ``code`` [N * groups]: nested_table[code] * nested_absmax[i / nested_block] +
    offset."""

    codes: torch.Tensor
    nested_absmax: torch.Tensor
    nested_table: torch.Tensor
    offset: float
    nested_block: int

    def plan(self, ext: ModuleType, bf16_dot: bool = False) -> Any:
        return ext.LutPlan.double_quant(bf16_dot, self.packed, self.N, self.K, self.lut, self.block, self.codes,
                                        self.nested_absmax, self.nested_table, float(self.offset), self.nested_block)


@dataclass(frozen=True)
class SpQRLut(LutLayout):
    """SpQR: ``stat_codes`` the packed 3-bit codes of scales and zeros [2, N, groups], each code * stat_scale +
    stat_zero (float16 [2, ceil(N / stat_group), groups]); outliers (CSR ``rowptr``, ``cols``, float16 ``values``)
    replace single weights."""

    stat_codes: torch.Tensor
    stat_scale: torch.Tensor
    stat_zero: torch.Tensor
    stat_group: int
    rowptr: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def plan(self, ext: ModuleType, bf16_dot: bool = False) -> Any:
        return ext.LutPlan.spqr(bf16_dot, self.packed, self.N, self.K, self.bits, self.lut, self.block, self.stat_codes,
                                self.stat_scale, self.stat_zero, self.stat_group, self.rowptr, self.cols, self.values)
