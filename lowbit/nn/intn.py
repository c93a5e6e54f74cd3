"""IntLinear: uniform intN weights (2, 3, 4 or 8 bits) with an fp16 scale and an integer zero per group
of input columns, the format of round-to-nearest and GPTQ."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.functional.absmax import Affine, dequantize_affine
from lowbit.functional.grouped import quantize_affine
from lowbit.formats import pack_2bit, pack_3bit, pack_4bit, unpack_2bit, unpack_3bit, unpack_4bit
from lowbit.kernels.layouts import LutLayout, PlainLut
from lowbit.config import IntConfig
from lowbit.nn.base import DequantLinear, check_range, linear_weight
from lowbit.registry import Format, Method, register

_PACKERS = {2: (pack_2bit, unpack_2bit), 3: (pack_3bit, unpack_3bit), 4: (pack_4bit, unpack_4bit),
            8: (lambda c: c.reshape(-1).to(torch.uint8), lambda p, n: p[:n])}


# Codes as values for the LUT kernels, which look up 4 bits: the 2- and 3-bit tables repeat.
CODE_LUTS = {b: torch.arange(2**b, dtype=torch.float32).repeat(16 // 2**b) for b in (2, 3, 4)}


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes take packed at ``bits`` bits (3-bit codes go eight to three bytes)."""
    return {2: -(-n // 4), 3: 3 * -(-n // 8), 4: -(-n // 2), 8: n}[bits]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return _PACKERS[bits][0](codes.reshape(-1).to(torch.uint8))


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    return _PACKERS[bits][1](packed, n)


_ZERO_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class IntLinear(DequantLinear):
    """y = x @ ((codes - zero) * scale)^T, codes of ``bits`` bits, scale and zero per group.

    The zero is an integer code (uint8: round-to-nearest, GPTQ, GGUF Q4_0 / Q8_0) or, with ``zero_dtype="float32"``,
    any number: GGUF's Q4_1 stores w = q * d + m, which is (q - (-m / d)) * d. The scale is float16, or float32
    (``scale_dtype``) for ``NF4Config(quant_type="int4")``, which has always kept it so.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, group_size: int = 128,
                 compute_dtype: torch.dtype = torch.float32, zero_dtype: str = "uint8",
                 scale_dtype: str = "float16") -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        if bits not in _PACKERS:
            raise ValueError(f"bits must be one of {sorted(_PACKERS)}, got {bits!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if zero_dtype not in _ZERO_DTYPES:
            raise ValueError(f"zero_dtype must be one of {', '.join(_ZERO_DTYPES)}, got {zero_dtype!r}")
        if scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {', '.join(_SCALE_DTYPES)}, got {scale_dtype!r}")
        self.bits, self.group_size, self.zero_dtype, self.scale_dtype = bits, group_size, zero_dtype, scale_dtype
        groups = -(-in_features // group_size)
        self.register_buffer("weight_packed", torch.zeros(packed_bytes(in_features * out_features, bits), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=_SCALE_DTYPES[scale_dtype]))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=_ZERO_DTYPES[zero_dtype]))

    @classmethod
    def from_linear(cls, module: nn.Module, bits: int = 4, group_size: int = 128,
                    compute_dtype: torch.dtype = torch.float32, clip_search: bool = False,
                    scale_dtype: str = "float16") -> "IntLinear":
        """Round-to-nearest: min-max statistics per group (optionally range-searched), weights to the nearest point."""
        q = quantize_affine(linear_weight(module), bits, group_size, clip_search, _SCALE_DTYPES[scale_dtype])
        return cls.from_codes(q.codes, q.scale, q.zero, module.bias, bits, group_size, compute_dtype,
                              scale_dtype=scale_dtype)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                   bits: int, group_size: int, compute_dtype: torch.dtype = torch.float32,
                   zero_dtype: str = "uint8", scale_dtype: str = "float16") -> "IntLinear":
        """A layer holding the given integer codes [out, in] and per-group scale / zero."""
        out_f, in_f = codes.shape
        layer = cls(in_f, out_f, bias is not None, bits, group_size, compute_dtype, zero_dtype, scale_dtype)
        layer.weight_packed = pack_codes(codes, bits)
        layer.weight_scale = scale.to(_SCALE_DTYPES[scale_dtype])
        layer.weight_zero = zero.to(_ZERO_DTYPES[zero_dtype])
        layer.copy_bias(bias)
        return layer

    def init_kwargs(self) -> dict:
        return {**super().init_kwargs(), "bits": self.bits, "group_size": self.group_size, "zero_dtype": self.zero_dtype,
                "scale_dtype": self.scale_dtype}

    def check_values(self) -> None:
        super().check_values()  # packed codes are all in range; scales may be negative (GGUF Q4_0 stores such)
        if self.zero_dtype == "uint8":  # an integer zero is a code of the grid
            check_range(self.weight_zero, "weight_zero", 0, 2**self.bits - 1)

    def codes(self) -> torch.Tensor:
        """The [out, in] integer codes."""
        n = self.in_features * self.out_features
        return unpack_codes(self.weight_packed, n, self.bits).view(self.out_features, self.in_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bits not in (4, 8) or self.in_features * self.bits % 8:
            return super().rows(ids)
        per_row = self.in_features * self.bits // 8  # each row starts on a byte
        packed = self.weight_packed.view(self.out_features, per_row)[ids].reshape(-1)
        codes = unpack_codes(packed, ids.numel() * self.in_features, self.bits).view(-1, self.in_features)
        q = Affine(codes, self.weight_scale[ids].float(), self.weight_zero[ids].float(), self.bits, self.group_size)
        return dequantize_affine(q, torch.float32)

    def lut_weight(self) -> LutLayout | None:
        if self.bits not in CODE_LUTS:
            return None
        return PlainLut(self.weight_packed, self.out_features, self.in_features, self.bits, CODE_LUTS[self.bits],
                         self.group_size, self.weight_scale, self.weight_zero)  # zero: uint8 or float32, both taken

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        q = Affine(self.codes(), self.weight_scale.float(), self.weight_zero.float(), self.bits, self.group_size)
        w = dequantize_affine(q, dtype)
        return w if out is None else out.copy_(w)

    def extra_repr(self) -> str:
        zero = "" if self.zero_dtype == "uint8" else ", float zero"
        return f"{super().extra_repr()}, int{self.bits}, group_size={self.group_size}{zero}"


BITS_AND_GROUP = {"bits": "bits", "blocksize": "group_size"}  # the command's --bits and --blocksize
register(Format(IntConfig, IntLinear,
                lambda module, c: IntLinear.from_linear(module, c.bits, c.group_size, c.compute_dtype, c.clip_search),
                methods={"rtn": Method({}, "round-to-nearest uniform intN, fp16 scale + zero per group of 128 (rtn3, "
                                           "rtn4: 3 or 4 bits)", BITS_AND_GROUP)},
                suffixes=True))
