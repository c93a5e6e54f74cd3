"""Get a lowbit-quantized transformers model ready for adapter training (the QLoRA recipe)."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.nn import QuantLinear


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Freeze every parameter but LoRA adapters' (``lora_*``), keep norms and the output head in fp32, and make the input embeddings' output require
    grad so that gradient checkpointing has a graph to recompute. Returns the model (changed in place)."""
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model has no lowbit layers: quantize it first (lowbit.quantize)")
    for name, p in model.named_parameters():
        if "lora_" in name:  # adapters already attached (LoftQ): they are what trains
            continue
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):  # norms, embeddings and head: fp32 for stable training
            p.data = p.data.float()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing:
        # Non-reentrant checkpointing: it recomputes through lowbit's autograd Function without tricks.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
