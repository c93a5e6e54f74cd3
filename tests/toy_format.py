"""A format defined in one file, as a user or a later issue would add one: a sign a weight and a scale a row.

Importing this module registers it; from then on ``lowbit.quantize(model, "toy-sign")``, plans, checkpoints,
transformers' from_pretrained and the ``lowbit`` command know it by name (tests/test_registry.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowbit.config import BaseConfig
from lowbit.nn.base import DequantLinear, check_range, linear_weight
from lowbit.registry import Format, Method, register


@dataclass
class SignConfig(BaseConfig):
    """Each weight as sign(w) times its row's mean |w|."""

    method: ClassVar[str] = "sign"
    compute_dtype: torch.dtype = torch.float32


class SignLinear(DequantLinear):
    """W = (2 * bit - 1) * scale[row]: one bit a weight (stored a byte each, for clarity) and a float32 row scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.register_buffer("weight_bits", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(out_features))

    @classmethod
    def from_linear(cls, module: nn.Module, compute_dtype: torch.dtype = torch.float32) -> "SignLinear":
        w = linear_weight(module).float()
        layer = cls(w.shape[1], w.shape[0], module.bias is not None, compute_dtype)
        layer.weight_bits = (w >= 0).to(torch.uint8)
        layer.weight_scale = w.abs().mean(1)
        layer.copy_bias(module.bias)
        return layer

    def check_values(self) -> None:
        super().check_values()
        check_range(self.weight_bits, "weight_bits", 0, 1)
        check_range(self.weight_scale, "weight_scale", 0)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        w = (2 * self.weight_bits.float() - 1) * self.weight_scale[:, None]
        return w.to(dtype) if out is None else out.copy_(w)


register(Format(SignConfig, SignLinear, lambda module, c: SignLinear.from_linear(module, c.compute_dtype),
                methods={"toy-sign": Method({}, "one sign a weight and a mean |w| a row (a test format)")}))
