"""calibrate(model, config, batches): GPTQ or SpQR over a whole model, block by block."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.calibrate.gptq import gptq_quantize
from lowbit.calibrate.sequential import LayerQuantizer, quantize_sequential
from lowbit.calibrate.spqr import spqr_quantize


def layer_quantizer(config) -> LayerQuantizer:
    """The function that quantizes one layer from its Hessian by GPTQ or SpQR, as ``config`` says."""
    from lowbit.config import GPTQConfig, SpQRConfig
    from lowbit.nn import IntLinear, SpQRLinear
    from lowbit.nn.base import linear_weight

    if isinstance(config, GPTQConfig):
        def layer(name, module, H):
            codes, scale, zero = gptq_quantize(linear_weight(module), H, config.bits, config.group_size,
                                               config.act_order, config.damp,
                                               clip_search=config.clip_search)
            return IntLinear.from_codes(codes, scale, zero, module.bias, config.bits, config.group_size, config.compute_dtype)
        return layer
    if isinstance(config, SpQRConfig):
        def layer(name, module, H):
            q = spqr_quantize(linear_weight(module), H, config.bits, config.group_size, 3, config.stat_group,
                              config.outlier_threshold, config.max_outliers, config.damp)
            return SpQRLinear.from_spqr(q, module.bias, config.bits, config.group_size, config.stat_group, config.compute_dtype)
        return layer
    raise TypeError(f"calibrate takes GPTQConfig or SpQRConfig, got {type(config).__name__}")


def calibrate(model: nn.Module, config, batches: torch.Tensor, skip=lambda name: False, progress: bool = True,
              before_block=None, after_block=None) -> dict:
    """Quantize the linear layers inside the model's blocks by GPTQ or SpQR, block by block; return timing stats."""
    from lowbit.config import GPTQConfig

    layer = layer_quantizer(config)
    desc = f"{'GPTQ' if isinstance(config, GPTQConfig) else 'SpQR'} {config.bits}-bit"
    return quantize_sequential(model, batches, layer, skip, progress, desc,
                               token_clip=config.token_clip, true_sequential=config.true_sequential,
                               before_block=before_block, after_block=after_block)
