"""Int8Linear: LLM.int8() (Dettmers et al., 2022) with outlier decomposition, and int8 weight-only."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.config import INT8_ACTIVATIONS, Int8Config, int8_activations
from lowbit.functional import outlier_columns, quantize_absmax, quantize_zeropoint_rows
from lowbit.functional.validate import check_finite_stats
from lowbit.kernels.matmul import cpu_kernels, int8_int8, int8_linear, q8_gemv
from lowbit.nn.base import QuantLinear, check_range, linear_weight, needs_autograd
from lowbit.registry import Format, Method, register


class Int8Linear(QuantLinear):
    """int8 weights, one absmax per output row. With ``weight_only`` the input stays in float;
    otherwise activations are int8 by row and the feature columns holding any |x| >= threshold are
    multiplied in float (mixed-precision decomposition; threshold 0 turns it off).

    ``activations="zeropoint"`` (the default) is the paper's asymmetric vector-wise variant (its Table 1): each
    token's step is (max - min) / 255, never coarser than absmax's absmax / 127, at about the same speed (the zero point
    folds back in as an integer times the weight rows' code sums). ``"absmax"`` is LLM.int8() as bitsandbytes runs
    it. Both take a token's scale over the non-outlier columns only (docs/int8.md: what bitsandbytes does instead)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 weight_only: bool = False, compute_dtype: torch.dtype = torch.float32,
                 activations: str | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        activations = int8_activations(activations, weight_only)  # weight-only layers keep their old kwargs: absmax
        if activations not in INT8_ACTIVATIONS:
            raise ValueError(f"activations must be one of {INT8_ACTIVATIONS}, got {activations!r}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0 (0 turns decomposition off), got {threshold}")
        self.threshold, self.weight_only, self.activations = float(threshold), weight_only, activations
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_absmax", torch.zeros(out_features))

    @classmethod
    def from_linear(cls, module: nn.Module, threshold: float = 6.0, weight_only: bool = False,
                    compute_dtype: torch.dtype = torch.float32, activations: str | None = None) -> "Int8Linear":
        w = linear_weight(module)
        layer = cls(w.shape[1], w.shape[0], module.bias is not None, threshold, weight_only, compute_dtype, activations)
        layer.weight_codes, layer.weight_absmax = quantize_absmax(w.float(), dim=-1)
        layer.copy_bias(module.bias)
        return layer

    def init_kwargs(self) -> dict:
        return {**super().init_kwargs(), "threshold": self.threshold, "weight_only": self.weight_only,
                "activations": self.activations}

    def check_values(self) -> None:
        super().check_values()
        check_range(self.weight_codes, "weight_codes", -127, 127)  # absmax codes: round(127 w / absmax)
        check_range(self.weight_absmax, "weight_absmax", 0)

    def _code_sums(self) -> torch.Tensor:
        """Row sums of the int8 weight, computed once per weight (recomputed if the codes change)."""
        key = (self.weight_codes.data_ptr(), self.weight_codes._version)
        cached = getattr(self, "_sums", None)
        if cached is None or cached[0] != key:
            cached = self._sums = (key, self.weight_codes.sum(1, dtype=torch.int32))
        return cached[1]

    def dequantize(self) -> torch.Tensor:
        return self.weight_codes.float() * (self.weight_absmax / 127).unsqueeze(1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_codes[ids].float() * (self.weight_absmax[ids] / 127).unsqueeze(1)  # as dequantize

    def weight_tiles(self, dtype: torch.dtype):
        scale = (self.weight_absmax / 127).to(dtype).unsqueeze(1)
        for r0, r1 in self.row_ranges(dtype):
            yield r0, r1, self.weight_codes[r0:r1].to(dtype) * scale[r0:r1]

    def decode_weight(self) -> Any:
        ext = cpu_kernels(self.weight_codes)
        if ext is None or not self.weight_only or self.compute_dtype != torch.float32:  # as decode_call
            return None
        return ext.DecodeWeight.int8(self.weight_codes, (self.weight_absmax / 127).float(), self.bias)

    def decode_call(self):
        ext = cpu_kernels(self.weight_codes)
        # LLM.int8's fused call checks its input's finiteness, and bf16 compute rounds the input first: both keep
        # their whole forward.
        if ext is None or not self.weight_only or self.compute_dtype != torch.float32:
            return self.forward
        codes, row_scale = self.weight_codes, (self.weight_absmax / 127).float()
        return self._bound_gemv(lambda x2: ext.int8_gemv(x2, codes, row_scale))

    def quantized_forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        self._check_input(x)
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        row_scale = (self.weight_absmax / 127).to(self.compute_dtype)
        if self.weight_only:
            if needs_autograd(x) or reference:
                # The per-row scale commutes with the matmul: scale the outputs, not the weight.
                y = torch.nn.functional.linear(x2, self.weight_codes.to(self.compute_dtype)) * row_scale
            else:
                y = int8_linear(x2, self.weight_codes, self.weight_absmax / 127, self.compute_dtype)
            return self._finish(y, dtype).reshape(*shape[:-1], self.out_features)
        if self.compute_dtype == torch.float32 and not reference and not needs_autograd(x):
            fused = q8_gemv(x2, self.weight_codes, self._code_sums(), row_scale, self.threshold, self.out_features,
                            zero_point=self.activations == "zeropoint")
            if fused is not None:
                y, x_absmax, finite = fused
                if not finite:
                    check_finite_stats(x_absmax)
                if not bool(torch.isfinite(y).all()):  # inf in an outlier column is summed in float, not flagged
                    check_finite_stats(x2.abs().amax(dim=-1), "input")
                return self._finish(y, dtype).reshape(*shape[:-1], self.out_features)
        # NaN and +-inf alike are refused (as the fused path does): an outlier column would otherwise carry inf
        # through in float while NaN fails in quantization, two behaviours for one kind of bad input.
        check_finite_stats(x2.abs().amax(dim=-1), "input")
        outliers = outlier_columns(x2, self.threshold)
        if outliers.numel():
            x_out = x2[:, outliers]
            x2 = x2.index_fill(1, outliers, 0.0)  # the token's scale then comes from the other columns only
        if self.activations == "absmax":
            xq, x_absmax = quantize_absmax(x2.float(), dim=-1)
            x_scale, x_shift = x_absmax / 127, None
        else:  # x ~ (codes + shift) * scale: the uint8 u - zero with u stored as the int8 u - 128
            xq, x_scale, x_shift = quantize_zeropoint_rows(x2)
        if reference:  # exact integer product in float64, no int8 kernel
            acc = xq.double() @ self.weight_codes.double().t()
        else:
            acc = int8_int8(xq, self.weight_codes, self._code_sums())
        if x_shift is not None:  # the zero point times each weight row's code sum, still in integers
            acc = acc.addr_(x_shift, self._code_sums())
        y = (acc.to(torch.float32) * x_scale.unsqueeze(1)).to(self.compute_dtype) * row_scale
        if outliers.numel():
            w_out = self.weight_codes[:, outliers].to(self.compute_dtype) * row_scale.unsqueeze(1)
            y = y + x_out @ w_out.t()
        return self._finish(y, dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = "weight-only" if self.weight_only else f"threshold={self.threshold}, activations={self.activations}"
        return f"{super().extra_repr()}, {mode}"


_THRESHOLD = {"threshold": "threshold"}
register(Format(Int8Config, Int8Linear,
                lambda module, c: Int8Linear.from_linear(module, c.threshold, c.weight_only, c.compute_dtype,
                                                         c.activations),
                methods={
                    "int8": Method({"activations": "zeropoint"}, "LLM.int8(): int8 weights, int8 zero-point "
                                   "activations per token, |x| >= 6 columns in float", _THRESHOLD),
                    "int8-absmax": Method({"activations": "absmax"}, "LLM.int8() with absmax activations per token, "
                                          "as bitsandbytes runs it", _THRESHOLD),
                    "int8-zp": Method({"activations": "zeropoint"}, "the same as int8 (zero-point activations; its "
                                      "name from before they became the default)", _THRESHOLD),
                    "int8-weight": Method({"weight_only": True, "activations": "absmax"},
                                          "int8 weights (absmax per output row), float activations"),
                }))
