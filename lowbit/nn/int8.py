"""Int8Linear: LLM.int8() (Dettmers et al., 2022) with outlier decomposition, and int8 weight-only."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.functional import quantize_absmax
from lowbit.nn.base import QuantLinear, linear_weight


class Int8Linear(QuantLinear):
    """int8 weights, one absmax per output row. With ``weight_only`` the input stays in float;
    otherwise activations are int8 by row and the feature columns holding any |x| >= threshold are
    multiplied in float (mixed-precision decomposition; threshold 0 turns it off)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 weight_only: bool = False, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.threshold, self.weight_only = float(threshold), weight_only
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_absmax", torch.zeros(out_features))

    @classmethod
    def from_linear(cls, module: nn.Module, threshold: float = 6.0, weight_only: bool = False,
                    compute_dtype: torch.dtype = torch.float32) -> "Int8Linear":
        w = linear_weight(module)
        layer = cls(w.shape[1], w.shape[0], module.bias is not None, threshold, weight_only, compute_dtype)
        layer.weight_codes, layer.weight_absmax = quantize_absmax(w.float(), dim=-1)
        layer.copy_bias(module)
        return layer

    def dequantize(self) -> torch.Tensor:
        return self.weight_codes.float() * (self.weight_absmax / 127).unsqueeze(1)

    def forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        self._check_input(x)
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        row_scale = (self.weight_absmax / 127).to(self.compute_dtype)
        if self.weight_only:
            # The per-row scale commutes with the matmul: scale the outputs, not the weight.
            y = torch.nn.functional.linear(x2, self.weight_codes.to(self.compute_dtype)) * row_scale
            return self._finish(y, dtype).reshape(*shape[:-1], self.out_features)
        outliers = None
        if self.threshold > 0:
            cols = (x2.abs() >= self.threshold).any(dim=0)
            if bool(cols.any()):
                outliers = cols.nonzero().squeeze(1)
                x_out = x2[:, outliers]
                x2 = x2.index_fill(1, outliers, 0.0)
        xq, x_absmax = quantize_absmax(x2.float(), dim=-1)
        if reference:  # exact integer product in float64, no int8 kernel
            acc = (xq.double() @ self.weight_codes.double().t()).to(torch.float32)
        else:
            acc = torch._int_mm(xq, self.weight_codes.t()).to(torch.float32)
        y = (acc * (x_absmax / 127).unsqueeze(1)).to(self.compute_dtype) * row_scale
        if outliers is not None:
            w_out = self.weight_codes[:, outliers].to(self.compute_dtype) * row_scale.unsqueeze(1)
            y = y + x_out @ w_out.t()
        return self._finish(y, dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = "weight-only" if self.weight_only else f"threshold={self.threshold}"
        return f"{super().extra_repr()}, {mode}"
