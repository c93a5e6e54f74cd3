"""Deploying trained adapters: fold them into the base, re-quantized or in full precision."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from lowbit.nn import QuantLinear, SpQRLinear
from lowbit.nn.base import check_plain_linear, replace_module
from lowbit.train.lora import LoraQuantLinear


def _merged_weight(name: str, layer: LoraQuantLinear) -> torch.Tensor:
    check_plain_linear(layer.base_layer, name)
    w = layer.base_layer.dequantize().float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            w = w + layer.get_delta_weight(adapter)
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
            replace_module(model, name, _dense(_merged_weight(name, m), m.base_layer.bias))
    return model


def _requantized(name: str, base: QuantLinear, weight: torch.Tensor) -> QuantLinear:
    """``weight`` rounded to nearest into a layer of ``base``'s type and settings."""
    settings = base.init_kwargs()
    # from_linear takes the quantization settings only: the shape and bias come from the dense layer, and a
    # constructor-only setting (IntLinear's zero_dtype, BitLinear's input_norm) is one it does not choose.
    accepted = list(inspect.signature(type(base).from_linear).parameters)[1:]
    kwargs = {k: v for k, v in settings.items() if k in accepted}
    if "compute_dtype" in kwargs:
        kwargs["compute_dtype"] = getattr(torch, kwargs["compute_dtype"])
    layer = type(base).from_linear(_dense(weight, base.bias), **kwargs)
    rebuilt = layer.init_kwargs()
    lost = {k: v for k, v in settings.items() if rebuilt.get(k) != v}
    if lost:
        raise ValueError(f"{name}: {type(base).__name__}.from_linear cannot re-quantize with this layer's settings "
                         f"{lost}; use merge_to_full_precision")
    return layer


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
        replace_module(model, name, _requantized(name, base, _merged_weight(name, m)))
    return model
