"""The named quantization methods of the command line and the comparison: name -> what it does to a model."""
from __future__ import annotations

import re

import torch
from torch import nn

from lowbit.config import CALIBRATED, QuantConfig, config_from_name
from lowbit.quantize import quantize

METHODS: dict[str, str] = {
    "fp32": "full precision, the reference",
    "bf16": "bfloat16 weights and compute",
    "int8": "LLM.int8(): int8 weights, int8 zero-point activations per token, |x| >= 6 columns in float",
    "int8-absmax": "LLM.int8() with absmax activations per token, as bitsandbytes runs it",
    "int8-zp": "the same as int8 (zero-point activations; its name from before they became the default)",
    "int8-weight": "int8 weights (absmax per output row), float activations",
    "nf4": "NF4 blocksize 64 + double quantization (QLoRA)",
    "fp4": "FP4 blocksize 64 + double quantization",
    "int4": "uniform asymmetric int4, groups of 64",
    "ternary": "BitNet b1.58 ternary weights + int8 activations (post-training: b1.58 needs training)",
    "rtn": "round-to-nearest uniform intN, fp16 scale + zero per group of 128 (rtn3, rtn4: 3 or 4 bits)",
    "gptq": "GPTQ: intN groups of 128, errors compensated with calibration data (gptq3, gptq4)",
    "spqr": "SpQR: intN groups of 16 with 3-bit statistics + sparse fp16 outliers (spqr3, spqr4)",
    "native": "a GGUF file's own Q4_0 / Q4_1 / Q8_0 weights, loaded as they are (smollm2-135m: Q4_1, groups of 32)",
}
LOADED = ("native",)  # methods that are a way of loading the model, not something done to a loaded one
_WITH_BITS = re.compile(r"^(rtn|gptq|spqr)([2348])?$")
DEFAULT_COMPARE = ("fp32", "bf16", "int8", "int8-absmax", "int8-weight", "nf4", "fp4", "int4", "ternary")


def check_method(name: str) -> str:
    """``name`` if it is a known method (rtn, gptq and spqr may carry their bits: gptq3), else a ValueError."""
    if name not in METHODS and not _WITH_BITS.match(name):
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (rtn, gptq, spqr take a bits suffix: gptq3)")
    return name


def describe(name: str) -> str:
    m = _WITH_BITS.match(name)
    return METHODS[m.group(1)] + (f"; {m.group(2)} bits" if m and m.group(2) else "") if m else METHODS[name]


def needs_calibration(name: str) -> bool:
    return name.startswith(("gptq", "spqr"))


# The command's options and the config field each sets, per family of methods.
_OPTION_FIELDS = {
    "rtn": {"bits": "bits", "blocksize": "group_size"}, "gptq": {"bits": "bits", "blocksize": "group_size"},
    "spqr": {"bits": "bits", "blocksize": "group_size"},
    "int8": {"threshold": "threshold"}, "int8-absmax": {"threshold": "threshold"},
    "int8-zp": {"threshold": "threshold"}, "int8-weight": {},
    "nf4": {"blocksize": "blocksize", "double_quant": "double_quant"},
    "fp4": {"blocksize": "blocksize", "double_quant": "double_quant"}, "int4": {"blocksize": "blocksize"},
    "ternary": {}, "fp32": {}, "bf16": {}, "native": {},
}


def method_config(name: str, blocksize: int | None = None, double_quant: bool | None = None,
                  threshold: float | None = None, bits: int | None = None) -> QuantConfig | None:
    """The quantization config of a method (None for fp32 and bf16), with optional overrides; an option that
    does not apply to the method is a ValueError, not ignored."""
    check_method(name)
    family = m.group(1) if (m := _WITH_BITS.match(name)) else name
    given = {k: v for k, v in dict(blocksize=blocksize, double_quant=double_quant, threshold=threshold,
                                   bits=bits).items() if v is not None}
    fields = _OPTION_FIELDS[family]
    unused = [f"--{k.replace('_', '-')}" for k in given if k not in fields]
    if unused:
        takes = ", ".join(f"--{k.replace('_', '-')}" for k in fields) or "no options"
        verb = "does" if len(unused) == 1 else "do"
        raise ValueError(f"{' and '.join(sorted(unused))} {verb} not apply to {name} (it takes {takes})")
    if name in ("fp32", "bf16", *LOADED):
        return None
    return config_from_name(name, **{fields[k]: v for k, v in given.items()})


def apply_method(model: nn.Module, name: str, progress: bool = True, calibration: torch.Tensor | None = None,
                 **overrides) -> nn.Module:
    """Quantize (or cast) ``model`` in place by the named method and return it (GPTQ/SpQR use ``calibration``)."""
    config = method_config(name, **{k: v for k, v in overrides.items() if v is not None})
    if name in LOADED:
        raise ValueError(f"{name} is a way of loading a GGUF model (lowbit.app.models.load_native), not a method to "
                         "apply to a loaded one")
    if name == "bf16":
        return model.to(torch.bfloat16)
    if config is None:
        return model
    return quantize(model, config, progress=progress, calibration=calibration if isinstance(config, CALIBRATED) else None)
