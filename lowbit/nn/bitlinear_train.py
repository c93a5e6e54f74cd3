"""BitNet b1.58 training (Ma et al., 2024): a linear layer with latent full-precision weights that computes with
ternary weights and 8-bit per-token activations, trained through straight-through estimators."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.functional.ternary import ABSMEAN_EPS, quantize_ternary
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


class TrainableBitLinear(nn.Linear):
    """y = Q8(RMSNorm(x)) @ T(W)^T: W latent (trained), T its absmean ternary form; ``pack()`` gives the inference
    layer (2 bits a weight) with the same outputs up to float rounding."""

    input_norm = True  # what lowbit.nn.base.check_plain_linear looks for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm sits inside the layer, before the activation quantizer (BitNet's SubLN placement), so every
        # layer's int8 input has a controlled scale, including o_proj's and down_proj's.
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
