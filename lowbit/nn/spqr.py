"""SpQRLinear: dense low-bit weights on 3-bit-quantized tiny-group statistics, plus sparse fp16 outliers (CSR)."""
from __future__ import annotations

import torch

from lowbit.functional.grouped import SpQRWeight, dequantize_stats
from lowbit.formats import pack_3bit, unpack_3bit
from lowbit.kernels.layouts import LutLayout, SpQRLut
from lowbit.nn.base import DequantLinear, check_range
from lowbit.nn.intn import CODE_LUTS, pack_codes, packed_bytes, unpack_codes
from lowbit.registry import register_layer


@register_layer  # built by SpQR's calibration (lowbit.calibrate.spqr), loaded from checkpoints without it
class SpQRLinear(DequantLinear):
    """W = (codes - zero) * scale + sparse outliers; scale and zero per (row, group), themselves 3-bit."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 3, group_size: int = 16,
                 stat_bits: int = 3, stat_group: int = 16, outliers: int = 0,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        if stat_bits != 3:
            raise ValueError("statistics are stored as packed 3-bit codes (stat_bits=3)")
        self.bits, self.group_size, self.stat_bits, self.stat_group = bits, group_size, stat_bits, stat_group
        groups, row_blocks = -(-in_features // group_size), -(-out_features // stat_group)
        self.register_buffer("weight_packed", torch.zeros(packed_bytes(in_features * out_features, bits), dtype=torch.uint8))
        self.register_buffer("stat_packed", torch.zeros(packed_bytes(2 * out_features * groups, 3), dtype=torch.uint8))
        self.register_buffer("stat_scale", torch.ones(2, row_blocks, groups, dtype=torch.float16))
        self.register_buffer("stat_zero", torch.zeros(2, row_blocks, groups, dtype=torch.float16))
        self.register_buffer("outlier_values", torch.zeros(outliers, dtype=torch.float16))
        self.register_buffer("outlier_cols", torch.zeros(outliers, dtype=torch.int16 if in_features < 2**15 else torch.int32))
        self.register_buffer("outlier_rowptr", torch.zeros(out_features + 1, dtype=torch.int32))

    @classmethod
    def from_spqr(cls, q: SpQRWeight, bias: torch.Tensor | None, bits: int, group_size: int, stat_group: int,
                  compute_dtype: torch.dtype = torch.float32) -> "SpQRLinear":
        out_f, in_f = q.codes.shape
        nnz = int(q.outliers.sum())
        layer = cls(in_f, out_f, bias is not None, bits, group_size, 3, stat_group, nnz, compute_dtype)
        layer.weight_packed = pack_codes(torch.where(q.outliers, 0, q.codes), bits)
        layer.stat_packed = pack_3bit(q.stat_codes.reshape(-1))
        layer.stat_scale, layer.stat_zero = q.stat_scale.half(), q.stat_zero.half()
        rows, cols = q.outliers.nonzero(as_tuple=True)  # row-major order: CSR
        layer.outlier_values = q.values[rows, cols].half()
        layer.outlier_cols = cols.to(layer.outlier_cols.dtype)
        layer.outlier_rowptr = torch.nn.functional.pad(torch.bincount(rows, minlength=out_f).cumsum(0), (1, 0)).to(torch.int32)
        layer.copy_bias(bias)
        return layer

    def init_kwargs(self) -> dict:
        return {**super().init_kwargs(), "bits": self.bits, "group_size": self.group_size, "stat_bits": self.stat_bits,
                "stat_group": self.stat_group, "outliers": self.outlier_values.numel()}

    def check_values(self) -> None:
        super().check_values()  # weight and statistic codes are packed: all in range
        check_range(self.outlier_cols, "outlier_cols", 0, self.in_features - 1)
        ptr = self.outlier_rowptr
        if int(ptr[0]) != 0 or int(ptr[-1]) != self.num_outliers() or bool((ptr[1:] < ptr[:-1]).any()):
            raise ValueError(f"outlier_rowptr is not a row index of the {self.num_outliers()} outliers (it must rise "
                             f"from 0 to {self.num_outliers()})")

    def num_outliers(self) -> int:
        return self.outlier_values.numel()

    def dense_part(self) -> torch.Tensor:
        """The dequantized grouped weight without the outliers, float32 [out, in]."""
        out_f, in_f, g = self.out_features, self.in_features, self.group_size
        groups = self.stat_scale.shape[2]
        stat_codes = unpack_3bit(self.stat_packed, 2 * out_f * groups).view(2, out_f, groups)
        stats = [dequantize_stats(stat_codes[k], self.stat_scale[k].float(), self.stat_zero[k].float(), self.stat_group)
                 .repeat_interleave(g, dim=1)[:, :in_f] for k in range(2)]
        scale = torch.where(stats[0] > 0, stats[0], torch.full_like(stats[0], 1e-8))
        codes = unpack_codes(self.weight_packed, out_f * in_f, self.bits).view(out_f, in_f).float()
        return (codes - stats[1]) * scale

    def outlier_rows(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.out_features), torch.diff(self.outlier_rowptr.long()))

    def lut_weight(self) -> LutLayout | None:
        if self.bits not in CODE_LUTS:
            return None
        return SpQRLut(self.weight_packed, self.out_features, self.in_features, self.bits, CODE_LUTS[self.bits],
                       self.group_size, self.stat_packed, self.stat_scale, self.stat_zero, self.stat_group,
                       self.outlier_rowptr, self.outlier_cols, self.outlier_values)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        w = self.dense_part()
        w[self.outlier_rows(), self.outlier_cols.long()] = self.outlier_values.float()
        return w.to(dtype) if out is None else out.copy_(w)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, int{self.bits}, group_size={self.group_size}, "
                f"3-bit stats over {self.stat_group} rows, outliers={self.num_outliers()}")
