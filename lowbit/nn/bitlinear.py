"""BitLinear: BitNet b1.58 inference (Ma et al., 2024): ternary weights, per-token int8 activations."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit import functional as F
from lowbit.formats import ternary_2bit_valid, unpack_ternary_2bit
from lowbit.functional.validate import check_finite_stats
from lowbit.kernels.matmul import cpu_kernels, q8_gemv, ternary_int8
from lowbit.config import TernaryConfig
from lowbit.nn.base import QuantLinear, check_range, linear_weight
from lowbit.registry import Format, Method, register


NORM_EPS = 1e-6  # of the parameter-free RMSNorm that trained b1.58 layers apply to their input


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) over the last dimension, without a gain: the norm a trained b1.58 layer puts before its int8 input."""
    return nn.functional.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)


class BitLinear(QuantLinear):
    """y = (Q8(x) @ T^T) * gamma: T in {-1, 0, 1} packed 2 bits a weight, gamma = mean|W|.

    ``input_norm``: x is RMS-normalised first (no gain), as in layers trained as b1.58 (``TrainableBitLinear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute_dtype: torch.dtype = torch.float32,
                 input_norm: bool = False) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.input_norm = input_norm
        self.register_buffer("weight_packed", torch.zeros(-(-in_features * out_features // 4), dtype=torch.uint8))
        self.register_buffer("weight_gamma", torch.ones(()))

    def init_kwargs(self) -> dict:
        return {**super().init_kwargs(), "input_norm": self.input_norm}

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # The norm runs here, outside the frozen-weight matmul, so that autograd differentiates it (fine-tuning).
        return super().forward(rms_norm(x) if self.input_norm else x, **kwargs)

    @classmethod
    def from_linear(cls, module: nn.Module, compute_dtype: torch.dtype = torch.float32) -> "BitLinear":
        w = linear_weight(module).float()
        layer = cls(w.shape[1], w.shape[0], module.bias is not None, compute_dtype)
        layer.weight_packed, layer.weight_gamma = F.quantize_ternary(w)
        layer.copy_bias(module.bias)
        return layer

    def check_values(self) -> None:
        super().check_values()
        if not ternary_2bit_valid(self.weight_packed):  # the compiled kernel would read code 3 as the weight +2
            raise ValueError("weight_packed holds the 2-bit code 3, which is not a trit")
        check_range(self.weight_gamma, "weight_gamma", 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", input_norm=True" if self.input_norm else "")

    def trits(self) -> torch.Tensor:
        """The ternary weight matrix [out, in] as int8."""
        return unpack_ternary_2bit(self.weight_packed, self.in_features * self.out_features).view(self.out_features, -1)

    def dequantize(self) -> torch.Tensor:
        return self.trits().float() * self.weight_gamma

    def weight_tiles(self, dtype: torch.dtype):
        k = self.in_features
        if k % 4:  # rows do not start on a byte: unpack the whole matrix
            yield from super().weight_tiles(dtype)
            return
        for r0, r1 in self.row_ranges(dtype):
            trits = unpack_ternary_2bit(self.weight_packed[r0 * k // 4:r1 * k // 4], (r1 - r0) * k).view(r1 - r0, k)
            yield r0, r1, trits.to(dtype) * self.weight_gamma.to(dtype)

    def decode_weight(self) -> Any:
        ext = cpu_kernels(self.weight_packed)
        # the fused path of quantized_forward, whose arithmetic the native step repeats: float32, whole-byte rows
        if ext is None or self.compute_dtype != torch.float32 or self.in_features % 4:
            return None
        return ext.DecodeWeight.ternary(self.weight_packed, float(self.weight_gamma), self.out_features,
                                        self.in_features, self.bias, self.input_norm)

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        shape, dtype = x.shape, x.dtype
        if self.compute_dtype == torch.float32:  # a few rows: quantize, multiply and scale in one compiled call
            fused = q8_gemv(x.reshape(-1, self.in_features).float(), self.weight_packed, None,
                            self.weight_gamma.float().reshape(1), 0.0, self.out_features)
            if fused is not None:
                y, absmax, finite = fused
                if not finite:
                    check_finite_stats(absmax)
                return self._finish(y, dtype).reshape(*shape[:-1], self.out_features)
        xq, absmax = F.quantize_activations_int8(x.reshape(-1, self.in_features).float())
        # The two scales are applied once per output, after the integer product.
        acc = ternary_int8(xq, self.weight_packed, self.out_features, self.trits).float()  # exact int32
        y = acc * (absmax / 127).unsqueeze(1) * self.weight_gamma
        return self._finish(y.to(self.compute_dtype), dtype).reshape(*shape[:-1], self.out_features)


register(Format(TernaryConfig, BitLinear, lambda module, c: BitLinear.from_linear(module, c.compute_dtype),
                methods={"ternary": Method({}, "BitNet b1.58 ternary weights + int8 activations (post-training: "
                                               "b1.58 needs training)")}))
