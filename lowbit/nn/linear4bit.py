"""Linear4bit: NF4 / FP4 blockwise weights (optionally double-quantized). ``NF4Config(quant_type="int4")`` builds
an IntLinear (uniform 4-bit groups), the format it is."""
from __future__ import annotations

import torch
from torch import nn

from lowbit import functional as F
from lowbit.formats import codebook
from lowbit.kernels.layouts import DoubleQuantLut, LutLayout, PlainLut
from lowbit.config import NF4Config
from lowbit.nn.base import DequantLinear, check_range, linear_weight
from lowbit.nn.intn import IntLinear
from lowbit.registry import Format, Method, register

QUANT_TYPES = ("nf4", "fp4")


class Linear4bit(DequantLinear):
    """4-bit weights dequantized tile-free to ``compute_dtype`` for each forward (fp32 or bf16)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES} (uniform int4 is IntLinear), got {quant_type!r}")
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        n = in_features * out_features
        self.register_buffer("weight_packed", torch.zeros(-(-n // 2), dtype=torch.uint8))
        self.register_buffer("weight_code", codebook(quant_type))
        nblocks = -(-n // blocksize)
        if double_quant:
            self.register_buffer("weight_nested_codes", torch.zeros(nblocks, dtype=torch.uint8))
            self.register_buffer("weight_nested_absmax", torch.zeros(-(-nblocks // F.blockwise.DOUBLE_QUANT_BLOCKSIZE)))
            self.register_buffer("weight_nested_offset", torch.zeros(()))
            self.register_buffer("weight_nested_code", codebook("dynamic"))
        else:
            self.register_buffer("weight_absmax", torch.zeros(nblocks))

    @classmethod
    def from_linear(cls, module: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                    compute_dtype: torch.dtype = torch.float32) -> "Linear4bit":
        w = linear_weight(module).float()
        layer = cls(w.shape[1], w.shape[0], module.bias is not None, quant_type, blocksize, double_quant, compute_dtype)
        layer.set_weight(w)
        layer.copy_bias(module.bias)
        return layer

    def init_kwargs(self) -> dict:
        return {**super().init_kwargs(), "quant_type": self.quant_type, "blocksize": self.blocksize,
                "double_quant": self.double_quant}

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize and store an [out, in] float weight."""
        q = F.quantize_4bit(w, self.quant_type, self.blocksize, self.double_quant)
        self.weight_packed = q.codes
        if self.double_quant:
            n = q.nested
            self.weight_nested_codes, self.weight_nested_absmax = n.codes, n.absmax
            self.weight_nested_offset, self.weight_nested_code = n.offset.reshape(()), n.code
        else:
            self.weight_absmax = q.absmax

    def check_values(self) -> None:
        super().check_values()  # codes are 4-bit indices into 16 entries: every nibble is one
        for name in ("weight_absmax", "weight_nested_absmax"):  # absolute maxima of blocks
            if hasattr(self, name):
                check_range(getattr(self, name), name, 0)

    def blockwise(self) -> F.Blockwise:
        """The stored nf4/fp4 weight as a functional Blockwise."""
        shape = torch.Size([self.out_features, self.in_features])
        q = F.Blockwise(self.weight_packed, None, self.weight_code, self.blocksize, shape, torch.float32, 4, self.quant_type)
        if self.double_quant:
            q.nested = F.NestedAbsmax(self.weight_nested_codes, self.weight_nested_absmax, self.weight_nested_offset,
                                      self.weight_nested_code)
        else:
            q.absmax = self.weight_absmax
        return q

    def lut_weight(self) -> LutLayout | None:
        n, k = self.out_features, self.in_features
        if k % self.blocksize:  # blocks run over the flat weight: here they would straddle rows
            return None
        if self.double_quant:
            return DoubleQuantLut(self.weight_packed, n, k, 4, self.weight_code, self.blocksize,
                                  self.weight_nested_codes, self.weight_nested_absmax, self.weight_nested_code,
                                  float(self.weight_nested_offset), F.blockwise.DOUBLE_QUANT_BLOCKSIZE)
        return PlainLut(self.weight_packed, n, k, 4, self.weight_code, self.blocksize, self.weight_absmax)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        return F.dequantize_4bit(self.blockwise(), dtype, out=out)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"{super().extra_repr()}, {self.quant_type}, blocksize={self.blocksize}{dq}, compute={self.compute_dtype}"


_BLOCKS = {"blocksize": "blocksize", "double_quant": "double_quant"}
def build_4bit(module: nn.Module, c: NF4Config) -> Linear4bit | IntLinear:
    """The layer of an NF4Config: NF4 / FP4 blocks, or for "int4" uniform 4-bit groups of ``blocksize`` with the
    float32 scales that format has kept since it was a Linear4bit variant."""
    if c.quant_type == "int4":
        return IntLinear.from_linear(module, 4, c.blocksize, c.compute_dtype, scale_dtype="float32")
    return Linear4bit.from_linear(module, c.quant_type, c.blocksize, c.double_quant, c.compute_dtype)


register(Format(NF4Config, Linear4bit, build_4bit,
                methods={
                    "nf4": Method({"quant_type": "nf4"}, "NF4 blocksize 64 + double quantization (QLoRA)", _BLOCKS),
                    "fp4": Method({"quant_type": "fp4"}, "FP4 blocksize 64 + double quantization", _BLOCKS),
                    "int4": Method({"quant_type": "int4"}, "uniform asymmetric int4, groups of 64",
                                   {"blocksize": "blocksize"}),
                }))
