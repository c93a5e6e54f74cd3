"""lowbit.quantize(model, config): swap every eligible linear layer for its quantized counterpart."""
from __future__ import annotations

import warnings
from fnmatch import fnmatch

import torch
from torch import nn
from tqdm import tqdm

from lowbit.calibrate.run import layer_quantizer, progress_label
from lowbit.calibrate.sequential import find_blocks, quantize_sequential
from lowbit.config import QuantConfig, TernaryConfig, config_from_name
from lowbit.embeddings import quantize_embeddings
from lowbit.nn import HalfLinear, QuantLinear
from lowbit.plan import HALF, KEEP, Plan, plan_targets
from lowbit.registry import format_of, is_calibrated
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
    """The quantized replacement of one nn.Linear / Conv1D, by the registered format of ``config``."""
    fmt = format_of(config)
    if fmt.calibrated:
        raise TypeError(f"{type(config).__name__} needs calibration data: its layers are built from the Hessian of "
                        "their inputs (lowbit.quantize(model, config, calibration=ids))")
    return fmt.build(module, config)


def check_config(config) -> None:
    """TypeError unless ``config`` is the config of a registered format."""
    format_of(config)


def warn_post_training_ternary(config, stacklevel: int = 3) -> None:
    """Warn that ternary weights made after training lose the model (they are for BitNet b1.58 training);
    ``stacklevel`` 3 points at the caller of the function that calls this."""
    if isinstance(config, TernaryConfig):
        warnings.warn("ternary weights made post-training lose most of what the model knew (SmolLM2-135M: perplexity "
                      "from 12 to millions): BitNet b1.58 models are trained ternary from the start",
                      stacklevel=stacklevel)


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


def quantize(model: nn.Module, config: "QuantConfig | str | Plan", progress: bool = True,
             calibration: torch.Tensor | None = None) -> nn.Module:
    """Replace the model's eligible linear layers in place (LM head and tied embeddings kept); return it.

    ``config`` is a config object or a method's name with its defaults ("nf4", "int8", "gptq3": see
    ``lowbit.config.config_from_name``).

    A ``lowbit.plan.Plan`` gives each layer its own format (and the embeddings theirs): a mixed-format model. A
    config is applied as a plan whose every eligible layer has that format.

    GPTQConfig and SpQRConfig need ``calibration``: token ids [sequences, length], for example from
    ``lowbit.calibrate.calibration_batches(tokenizer, text)``.
    """
    if isinstance(config, str):
        config = config_from_name(config)
    if not isinstance(config, Plan):
        check_config(config)
    if any(getattr(m, "input_norm", False) for m in model.modules()):
        raise ValueError("this model was trained as BitNet b1.58: its layers are ternary already (pack them with "
                         "lowbit.train.pack_bitnet)")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantized by lowbit; load or build the full-precision model to quantize again")
    if isinstance(config, Plan):
        targets = {n: f for n, f in plan_targets(model, config).items() if f != KEEP}
        apply_formats(model, targets, config.embeddings, calibration, progress, "calibrating the plan")
    else:
        layers = eligible_layers(model, config)
        if not layers:
            raise ValueError("no nn.Linear or Conv1D layer to quantize (check the skip patterns)")
        targets = {name: config for name, _ in layers}
        desc = "calibrating"
        if is_calibrated(config):  # calibration goes block by block: eligible layers outside the blocks stay as they are
            check_calibration(config, calibration)
            prefix, _ = find_blocks(model)
            targets = {n: f for n, f in targets.items() if n.startswith(prefix + ".")}
            desc = progress_label(config)
        apply_formats(model, targets, KEEP, calibration, progress, desc)
    model.lowbit_config = config
    return model


def apply_formats(model: nn.Module, targets: dict[str, QuantConfig | str], embeddings: str = KEEP,
                  calibration: torch.Tensor | None = None, progress: bool = True, desc: str = "calibrating") -> None:
    """The one quantization pipeline: each named layer in its format (a config, or ``HALF`` for bf16 weights), the
    embeddings in theirs, calibrated formats block by block on ``calibration``, each with its own settings.

    One transaction: every layer that needs no calibration is built before any is swapped in, and a failure during
    calibration puts every original layer (and the embeddings) back, so a failure leaves the model as it was."""
    calibrated = {n: f for n, f in targets.items() if is_calibrated(f)}
    if calibrated:
        check_calibration(next(iter(calibrated.values())), calibration)
        prefix, _ = find_blocks(model)
        outside = [n for n in calibrated if not n.startswith(prefix + ".")]
        if outside:
            raise ValueError(f"{outside[0]} is outside the model's blocks: GPTQ and SpQR calibrate block by block; "
                             "give it a format without calibration (int8-weight, rtn4, bfloat16, ...)")
    for f in {id(f): f for f in targets.values()}.values():
        warn_post_training_ternary(f, stacklevel=4)  # the line that called lowbit.quantize
    built = []
    plain = [(n, f) for n, f in targets.items() if n not in calibrated]
    for name, fmt in tqdm(plain, desc="quantizing", disable=None if progress else True, leave=False):
        module = model.get_submodule(name)
        try:
            with torch.no_grad():
                built.append((name, HalfLinear.from_linear(module) if fmt == HALF else build_layer(module, fmt)))
        except (ValueError, TypeError, RuntimeError) as e:
            raise type(e)(f"layer {name}: {e} (the model was left unchanged)") from e
    originals = {n: model.get_submodule(n) for n in targets}
    emb_before = model.get_input_embeddings() if embeddings != KEEP else None
    head_before = model.get_output_embeddings() if emb_before is not None else None
    quantize_embeddings(model, embeddings)
    for name, layer in built:
        replace_module(model, name, layer)
    if calibrated:  # later blocks calibrate on the outputs of the quantized ones, every format in place
        quantizers = {n: layer_quantizer(c) for n, c in calibrated.items()}
        try:
            model.lowbit_calibration = quantize_sequential(
                model, calibration, lambda name, module, H: quantizers[name](name, module, H),
                lambda name: name not in calibrated, progress, desc,
                token_clip=lambda name: calibrated[name].token_clip,  # each layer its own config's settings
                true_sequential=lambda name: calibrated[name].true_sequential)
        except BaseException:
            for name, module in originals.items():
                replace_module(model, name, module)
            if emb_before is not None:
                model.set_input_embeddings(emb_before)
                model.set_output_embeddings(head_before)
            raise
    own_memory(model)


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
