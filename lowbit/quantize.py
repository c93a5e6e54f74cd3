"""lowbit.quantize(model, config): swap every eligible linear layer for its quantized counterpart."""
from __future__ import annotations

import warnings
from fnmatch import fnmatch

import torch
from torch import nn
from tqdm import tqdm

from lowbit.config import CALIBRATED, Int8Config, IntConfig, NF4Config, QuantConfig, TernaryConfig, config_from_name
from lowbit.nn import BitLinear, Int8Linear, IntLinear, Linear4bit, QuantLinear
from lowbit.nn.base import is_linear_like, replace_module, tied_to_embeddings


def _selected(model: nn.Module, patterns: tuple[str, ...] | None) -> set[str] | None:
    """Names of the linear layers the config's ``modules`` patterns name (a container names those under it)."""
    if patterns is None:
        return None
    chosen = set()
    for pattern in patterns:
        hits = [(n, m) for n, m in model.named_modules() if n and fnmatch(n, pattern)]
        if not hits:
            raise ValueError(f"modules pattern {pattern!r} matches no module of this model")
        for name, module in hits:
            if is_linear_like(module):
                chosen.add(name)
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f"{name} is {type(module).__name__}, not a linear layer: lowbit quantizes nn.Linear "
                                f"and transformers Conv1D layers only (modules pattern {pattern!r})")
            else:
                chosen.update(f"{name}.{n}" for n, m in module.named_modules() if n and is_linear_like(m))
    return chosen


def eligible_layers(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers ``quantize`` would replace."""
    tied = tied_to_embeddings(model)
    selected = _selected(model, config.modules)
    out = []
    for name, module in model.named_modules():
        if not is_linear_like(module) or any(fnmatch(name, p) for p in config.skip):
            continue
        if selected is not None and name not in selected:
            continue
        if id(module.weight) in tied:
            continue
        out.append((name, module))
    return out


def build_layer(module: nn.Module, config: QuantConfig) -> QuantLinear:
    """The quantized replacement of one nn.Linear / Conv1D."""
    if isinstance(config, Int8Config):
        return Int8Linear.from_linear(module, config.threshold, config.weight_only, config.compute_dtype,
                                      config.activations)
    if isinstance(config, NF4Config):
        return Linear4bit.from_linear(module, config.quant_type, config.blocksize, config.double_quant, config.compute_dtype)
    if isinstance(config, TernaryConfig):
        return BitLinear.from_linear(module, config.compute_dtype)
    if type(config) is IntConfig:
        return IntLinear.from_linear(module, config.bits, config.group_size, config.compute_dtype, config.clip_search)
    raise TypeError(f"config must be Int8Config, NF4Config, TernaryConfig or IntConfig (GPTQ and SpQR go through "
                    f"calibration), got {type(config).__name__}")


def check_config(config) -> None:
    """TypeError unless ``config`` is one of lowbit's quantization configs."""
    if not isinstance(config, (Int8Config, NF4Config, TernaryConfig, IntConfig, *CALIBRATED)):
        raise TypeError(f"config must be a lowbit config (NF4Config(), Int8Config(), ...) or a method name such as "
                        f"'nf4', got {type(config).__name__}")


def warn_post_training_ternary(config) -> None:
    """Warn that ternary weights made after training lose the model (they are for BitNet b1.58 training)."""
    if isinstance(config, TernaryConfig):
        warnings.warn("ternary weights made post-training lose most of what the model knew (SmolLM2-135M: perplexity "
                      "from 12 to millions): BitNet b1.58 models are trained ternary from the start", stacklevel=3)


def check_calibration(config, calibration) -> None:
    """ValueError unless ``calibration`` is what GPTQ / SpQR need: token ids [sequences, length]."""
    if calibration is None:
        raise ValueError(f"{type(config).__name__} needs calibration data: quantize(model, config, calibration=ids), "
                         "ids from lowbit.calibrate.calibration_batches(tokenizer, text)")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
        got = f"a {calibration.dim()}-D {calibration.dtype} tensor" if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be token ids of shape [sequences, length] (integers), got {got}: "
                         "lowbit.calibrate.calibration_batches(tokenizer, text) makes them")
    if calibration.numel() == 0:
        raise ValueError("calibration holds no tokens")


def quantize(model: nn.Module, config: "QuantConfig | str | lowbit.plan.Plan", progress: bool = True,
             calibration: torch.Tensor | None = None) -> nn.Module:
    """Replace the model's eligible linear layers in place (LM head and tied embeddings kept); return it.

    ``config`` is a config object or a method's name with its defaults ("nf4", "int8", "gptq3": see
    ``lowbit.config.config_from_name``).

    A ``lowbit.plan.Plan`` gives each layer its own format (and the embeddings theirs): a mixed-format model.

    GPTQConfig and SpQRConfig need ``calibration``: token ids [sequences, length], for example from
    ``lowbit.calibrate.calibration_batches(tokenizer, text)``.
    """
    if isinstance(config, str):
        config = config_from_name(config)
    from lowbit.plan import Plan, apply_plan

    if not isinstance(config, Plan):
        check_config(config)
    if any(getattr(m, "input_norm", False) for m in model.modules()):
        raise ValueError("this model was trained as BitNet b1.58: its layers are ternary already (pack them with "
                         "lowbit.train.pack_bitnet)")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantized by lowbit; load or build the full-precision model to quantize again")
    if isinstance(config, Plan):
        return apply_plan(model, config, calibration, progress)
    layers = eligible_layers(model, config)
    if not layers:
        raise ValueError("no nn.Linear or Conv1D layer to quantize (check the skip patterns)")
    if isinstance(config, CALIBRATED):
        check_calibration(config, calibration)
        from lowbit.calibrate.run import calibrate

        chosen = {name for name, _ in layers}
        try:
            model.lowbit_calibration = calibrate(model, config, calibration, lambda name: name not in chosen, progress)
        except BaseException:
            for name, module in layers:  # calibration replaces layers as it goes: put the originals back
                replace_module(model, name, module)
            raise
        own_memory(model)
        model.lowbit_config = config
        return model
    warn_post_training_ternary(config)
    # Build every replacement first and swap them in only when all succeeded: a layer that cannot be quantized
    # (an inf weight) leaves the model as it was, not half converted.
    built = []
    for name, module in tqdm(layers, desc="quantizing", disable=None if progress else True, leave=False):
        try:
            with torch.no_grad():
                built.append((name, build_layer(module, config)))
        except (ValueError, TypeError, RuntimeError) as e:
            raise type(e)(f"layer {name}: {e} (the model was left unchanged)") from e
    for name, layer in built:
        replace_module(model, name, layer)
    own_memory(model)
    model.lowbit_config = config
    return model


def own_memory(model: nn.Module) -> None:
    """Copy the parameters that stay in full precision (embeddings, norms, skipped layers) into memory of their own.

    transformers memory-maps safetensors checkpoints: while one tensor of the file is alive the whole mapping stays,
    and every page quantization read stays resident. For SmolLM2-135M after NF4: 840 -> 542 MB RSS (2026-12-02).
    Each parameter is copied once, so tied weights stay tied."""
    seen = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantLinear):
                continue
            for p in module.parameters(recurse=False):
                if id(p) not in seen and p.device.type == "cpu":
                    seen.add(id(p))
                    p.data = p.data.clone()
