"""The named quantization methods of the command line and the comparison: name -> what it does to a model."""
from __future__ import annotations


import torch
from torch import nn

from lowbit.config import QuantConfig, config_from_name
from lowbit.quantize import quantize
from lowbit import registry

# What the command does to a model besides the registered formats: references, and loading a GGUF file as it is.
REFERENCES = {
    "fp32": "full precision, the reference",
    "bf16": "bfloat16 weights and compute",
    "native": "a GGUF file's own Q4_0 / Q4_1 / Q8_0 weights, loaded as they are (smollm2-135m: Q4_1, groups of 32)",
}
LOADED = ("native",)  # methods that are a way of loading the model, not something done to a loaded one
DEFAULT_COMPARE = ("fp32", "bf16", "int8", "int8-absmax", "int8-weight", "nf4", "fp4", "int4", "ternary")


def methods() -> dict[str, str]:
    """Every method name the command takes, with its line of help: the references, then each registered format's."""
    found = {name: registry.lookup(name)[2].help for name in registry.method_names()}
    return {"fp32": REFERENCES["fp32"], "bf16": REFERENCES["bf16"], **found, "native": REFERENCES["native"]}


def check_method(name: str) -> str:
    """``name`` if it is a known method (rtn, gptq and spqr may carry their bits: gptq3), else a ValueError."""
    if name not in REFERENCES and registry.lookup(name) is None:
        suffixed = ", ".join(registry.suffixed_names())
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(methods())} ({suffixed} take a bits "
                         "suffix: gptq3)")
    return name


def describe(name: str) -> str:
    if name in REFERENCES:
        return REFERENCES[name]
    _, fields, method = registry.lookup(name)
    return method.help + (f"; {fields['bits']} bits" if "bits" in fields and "bits" not in method.fields else "")


def needs_calibration(name: str) -> bool:
    found = registry.lookup(name)
    return found is not None and found[0].calibrated


def option_fields(name: str) -> dict[str, str]:
    """The command's options the method takes -> the config field each sets."""
    found = registry.lookup(name)
    return {} if found is None else found[2].options


def method_config(name: str, blocksize: int | None = None, double_quant: bool | None = None,
                  threshold: float | None = None, bits: int | None = None) -> QuantConfig | None:
    """The quantization config of a method (None for fp32 and bf16), with optional overrides; an option that
    does not apply to the method is a ValueError, not ignored."""
    check_method(name)
    given = {k: v for k, v in dict(blocksize=blocksize, double_quant=double_quant, threshold=threshold,
                                   bits=bits).items() if v is not None}
    fields = option_fields(name)
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
    return quantize(model, config, progress=progress, calibration=calibration if registry.is_calibrated(config) else None)
