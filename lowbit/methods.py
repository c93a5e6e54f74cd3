"""The named quantization methods of the command line and the comparison: name -> what it does to a model."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.config import Int8Config, NF4Config, QuantConfig, TernaryConfig
from lowbit.quantize import quantize

METHODS: dict[str, str] = {
    "fp32": "full precision, the reference",
    "bf16": "bfloat16 weights and compute",
    "int8": "LLM.int8(): int8 weights, int8 absmax activations per token, |x| >= 6 columns in float",
    "int8-zp": "LLM.int8() with zero-point activations per token (the paper's asymmetric variant)",
    "int8-weight": "int8 weights (absmax per output row), float activations",
    "nf4": "NF4 blocksize 64 + double quantization (QLoRA)",
    "fp4": "FP4 blocksize 64 + double quantization",
    "int4": "uniform asymmetric int4, groups of 64",
    "ternary": "BitNet b1.58 ternary weights + int8 activations (post-training: b1.58 needs training)",
}
DEFAULT_COMPARE = ("fp32", "bf16", "int8", "int8-zp", "int8-weight", "nf4", "fp4", "int4", "ternary")


def check_method(name: str) -> str:
    """``name`` if it is a known method, else a ValueError that lists them."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return name


def method_config(name: str, blocksize: int | None = None, double_quant: bool | None = None,
                  threshold: float | None = None) -> QuantConfig | None:
    """The quantization config of a method (None for fp32 and bf16), with optional overrides."""
    check_method(name)
    if name in ("fp32", "bf16"):
        return None
    if name.startswith("int8"):
        return Int8Config(threshold=6.0 if threshold is None else threshold, weight_only=name == "int8-weight",
                          activations="zeropoint" if name == "int8-zp" else "absmax")
    if name in ("nf4", "fp4", "int4"):
        dq = (name != "int4") if double_quant is None else double_quant
        return NF4Config(quant_type=name, blocksize=blocksize or 64, double_quant=dq)
    return TernaryConfig()


def apply_method(model: nn.Module, name: str, progress: bool = True, **overrides) -> nn.Module:
    """Quantize (or cast) ``model`` in place by the named method and return it."""
    if name == "bf16":
        return model.to(torch.bfloat16)
    config = method_config(name, **overrides)
    return model if config is None else quantize(model, config, progress=progress)
