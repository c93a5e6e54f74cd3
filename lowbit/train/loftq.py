"""LoftQ (Li et al., 2023): quantize W and start the LoRA adapters at the quantization residual, so that the
low-bit model with its adapters begins close to the full-precision one."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from lowbit.config import NF4Config
from lowbit.nn import Linear4bit
from lowbit.nn.base import linear_weight
from lowbit.quantize import quantize
from lowbit.train.lora import LoraQuantLinear


def loftq_init(layer: LoraQuantLinear, weight: torch.Tensor, iters: int = 1, adapter: str = "default") -> None:
    """Alternate Q = quant(W - s B A) and (B, A) = rank-r SVD of (W - Q) / s, ``iters`` times; store Q and B, A."""
    base = layer.base_layer
    if not isinstance(base, Linear4bit):
        raise TypeError(f"LoftQ re-quantizes with Linear4bit.set_weight; got {type(base).__name__}")
    w = weight.float()
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    r, s = a.shape[0], layer.scaling[adapter]
    low_rank = torch.zeros_like(w)
    for _ in range(iters):
        base.set_weight(w - low_rank)
        u, sv, vh = torch.linalg.svd(w - base.dequantize(), full_matrices=False)
        root = sv[:r].sqrt()
        low_rank = (u[:, :r] * sv[:r]) @ vh[:r]
    with torch.no_grad():  # s * B @ A = the rank-r part of the residual
        b.copy_(u[:, :r] * root / s ** 0.5)
        a.copy_(root[:, None] * vh[:r] / s ** 0.5)


def loftq(model: nn.Module, config: NF4Config, lora_config, iters: int = 1, progress: bool = True):
    """Quantize a full-precision ``model`` with ``config`` and return ``peft.get_peft_model(model, lora_config)``
    with every adapted layer LoftQ-initialised from the layer's original weight."""
    import peft

    from lowbit.quantize import eligible_layers

    originals = {name: linear_weight(m).float().clone() for name, m in eligible_layers(model, config)}
    quantize(model, config, progress=False)
    peft_model = peft.get_peft_model(model, lora_config)
    layers = [(n, m) for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraQuantLinear)]
    for name, layer in tqdm(layers, desc="LoftQ", disable=None if progress else True):
        loftq_init(layer, originals[name], iters)
    return peft_model
