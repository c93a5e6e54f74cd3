"""BitNet b1.58 training (Ma et al., 2024): a linear layer with latent full-precision weights that computes with
ternary weights and 8-bit per-token activations, trained through straight-through estimators."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.functional.ternary import ABSMEAN_EPS, quantize_ternary
from lowbit.kernels.matmul import GEMV_MAX_ROWS, int8_int8
from lowbit.nn.bitlinear import BitLinear, rms_norm


class TernaryWeightSTE(torch.autograd.Function):
    """Forward: clamp(round(w / (gamma + eps)), -1, 1) * gamma with gamma = mean|w| (the packed layer's numbers).
    Backward: the identity (straight-through), so the latent weight gets dL/dW of the ternary weight."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        gamma = w.abs().mean()
        return torch.clamp(torch.round(w / (gamma + ABSMEAN_EPS)), -1, 1) * gamma

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class Int8ActivationSTE(torch.autograd.Function):
    """Forward: per-token absmax int8, round(x * 127 / absmax) * absmax / 127 (rows of zeros stay zero).
    Backward: the identity; absmax scaling never clips, so the estimator passes every element."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        absmax = x.abs().amax(-1, keepdim=True)
        scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
        return torch.round(x * scale) * (absmax / 127)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class TernaryInt8LinearSTE(torch.autograd.Function):
    """The two estimators above around one product, computed exactly in integers: forward Q8(x) @ T^T as an int8 x
    int8 -> int32 GEMM (lowbit's kernels), scaled by x's absmax / 127 and gamma; backward straight-through as they
    are, dx = dy @ (gamma T) and dW = dy^T @ Q8(x), in autocast's dtype when the forward ran under CPU autocast (T and
    the int8 codes are exact in bf16 and fp16). It saves the int8 codes of x, not a float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()  # codes from the float input, whatever autocast gave
        absmax = x2.abs().amax(-1, keepdim=True)
        scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
        xq = torch.round(x2 * scale).to(torch.int8)
        gamma = w.abs().mean()
        trits = torch.clamp(torch.round(w / (gamma + ABSMEAN_EPS)), -1, 1).to(torch.int8)
        # Training batches are many rows: torch's int8 GEMM, which torch.compile traces without a graph break
        acc = torch._int_mm(xq, trits.t()) if xq.shape[0] > GEMV_MAX_ROWS else \
            int8_int8(xq, trits, trits.sum(1, dtype=torch.int32))
        y = acc.to(torch.float32) * (absmax / 127) * gamma
        ctx.save_for_backward(xq, absmax, trits, gamma)
        ctx.x_dtype = x.dtype
        ctx.dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xq, absmax, trits, gamma = ctx.saved_tensors
        dt = ctx.dtype
        g2 = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = (g2.to(dt) @ trits.to(dt)).float() * gamma
        # Q8(x) is the codes times absmax / 127 by rows: that scale goes onto dy's rows, the codes stay exact
        grad_w = ((g2 * (absmax / 127)).to(dt).t() @ xq.to(dt)).float()
        return grad_x.reshape(*grad.shape[:-1], trits.shape[1]).to(ctx.x_dtype), grad_w


class TrainableBitLinear(nn.Linear):
    """y = Q8(RMSNorm(x)) @ T(W)^T: W latent (trained), T its absmean ternary form; ``pack()`` gives the inference
    layer (2 bits a weight) with the same outputs up to float rounding."""

    input_norm = True  # what lowbit.nn.base.check_plain_linear looks for
    fused = True  # the integer product (TernaryInt8LinearSTE); False: the two estimators around a float linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm sits inside the layer, before the activation quantizer (BitNet's SubLN placement), so every
        # layer's int8 input has a controlled scale, including o_proj's and down_proj's.
        if self.fused and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
                and self.weight.dtype == torch.float32:  # lowbit's and torch's int8 GEMMs here are the CPU's
            y = TernaryInt8LinearSTE.apply(rms_norm(x), self.weight)
            return y if self.bias is None else y + self.bias
        xq = Int8ActivationSTE.apply(rms_norm(x))
        return nn.functional.linear(xq, TernaryWeightSTE.apply(self.weight), self.bias)

    @classmethod
    def from_linear(cls, module: nn.Linear) -> "TrainableBitLinear":
        """A training layer whose latent weight starts as ``module``'s weight."""
        layer = cls(module.in_features, module.out_features, module.bias is not None,
                    device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(module.weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    @torch.no_grad()
    def pack(self) -> BitLinear:
        """The packed inference layer: trits 2 bits each, gamma, the same input norm, bias in float32."""
        layer = BitLinear(self.in_features, self.out_features, self.bias is not None, input_norm=True)
        layer.weight_packed, layer.weight_gamma = quantize_ternary(self.weight.float())
        layer.copy_bias(self.bias)
        return layer
