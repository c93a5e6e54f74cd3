"""calibrate(model, config, batches): GPTQ or SpQR (any calibrated format) over a whole model, block by block."""
from __future__ import annotations

import torch
from torch import nn

# Imported for their formats: each registers itself (lowbit/registry.py) next to its algorithm.
from lowbit.calibrate import gptq, gptq_blocks, spqr  # noqa: F401
from lowbit.calibrate.sequential import LayerQuantizer, quantize_sequential
from lowbit.registry import format_of


def layer_quantizer(config) -> LayerQuantizer:
    """The function that quantizes one layer from its Hessian, as the calibrated format of ``config`` does."""
    fmt = format_of(config)
    if not fmt.calibrated:
        raise TypeError(f"calibrate takes the config of a calibrated format (GPTQConfig, SpQRConfig), got "
                        f"{type(config).__name__}")
    return lambda name, module, H: fmt.build(module, H, config)


def progress_label(config) -> str:
    """What a calibration's progress bar says: "GPTQ 4-bit", "SpQR 3-bit"."""
    if hasattr(config, "block_type"):  # GPTQ onto a llama.cpp block type
        return f"GPTQ {config.block_type}"
    return f"{type(config).__name__.removesuffix('Config')} {config.bits}-bit"


def calibrate(model: nn.Module, config, batches: torch.Tensor, skip=lambda name: False, progress: bool = True,
              before_block=None, after_block=None) -> dict:
    """Quantize the linear layers inside the model's blocks by ``config``'s calibrated format, block by block;
    return timing stats."""
    return quantize_sequential(model, batches, layer_quantizer(config), skip, progress, progress_label(config),
                               token_clip=config.token_clip, true_sequential=config.true_sequential,
                               before_block=before_block, after_block=after_block)
