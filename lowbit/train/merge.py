"""Deploying trained adapters: fold them into the base, re-quantized or in full precision."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.nn import QuantLinear, SpQRLinear
from lowbit.nn.base import check_plain_linear, replace_module
from lowbit.train.lora import LoraQuantLinear


def _merged_weight(layer: LoraQuantLinear) -> torch.Tensor:
    check_plain_linear(layer.base_layer, "an adapted layer")
    w = layer.base_layer.dequantize().float()
    for name in layer.active_adapters:
        if name in layer.lora_A:
            w = w + layer.get_delta_weight(name)
    return w


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)


def _unwrap(peft_model: nn.Module) -> nn.Module:
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def merge_to_full_precision(peft_model: nn.Module) -> nn.Module:
    """Replace each adapted lowbit layer by an fp32 nn.Linear holding dequantize() + B A * scaling; returns the
    transformers model without PEFT wrappers (other lowbit layers stay quantized)."""
    model = _unwrap(peft_model)
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraQuantLinear):
            replace_module(model, name, _dense(_merged_weight(m), m.base_layer.bias))
    return model


def merge_and_requantize(peft_model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight and quantize the sum again with the layer's own settings (round to
    nearest; SpQR layers need calibration data and are refused). Returns the model without PEFT wrappers."""
    model = _unwrap(peft_model)
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoraQuantLinear):
            continue
        base: QuantLinear = m.base_layer
        if isinstance(base, SpQRLinear):
            raise TypeError(f"{name}: SpQR needs calibration data to re-quantize; merge_to_full_precision, then "
                            "lowbit.quantize(model, SpQRConfig(...), calibration=...)")
        kwargs = {k: v for k, v in base.init_kwargs().items() if k not in ("in_features", "out_features", "bias")}
        if "compute_dtype" in kwargs:
            kwargs["compute_dtype"] = getattr(torch, kwargs["compute_dtype"])
        new = type(base).from_linear(_dense(_merged_weight(m), base.bias), **kwargs)
        replace_module(model, name, new)
    return model
