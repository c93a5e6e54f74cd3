"""bitsandbytes' layers swapped into a model, for side-by-side comparisons (it must be installed)."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.interop.bitsandbytes import quiet_kernel_notice
from lowbit.nn.base import owner_of


def bnb_int8_layer(linear: nn.Linear, threshold: float = 6.0) -> nn.Module:
    """bitsandbytes' Linear8bitLt (LLM.int8, eval mode: int8 activations) holding ``linear``'s weight and bias."""
    quiet_kernel_notice()
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer.weight = layer.weight._quantize("cpu")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    # A new module is in training mode, where bitsandbytes' CPU path dequantizes the weight and never quantizes
    # activations (int8 weight-only): eval mode runs LLM.int8 itself.
    return layer.eval()


def bnb_nf4_layer(linear: nn.Linear) -> nn.Module:
    """bitsandbytes' Linear4bit (NF4, blocksize 64, double quant, fp32 compute) holding ``linear``'s weight, eval mode."""
    quiet_kernel_notice()
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)
    layer.weight = layer.weight._quantize("cpu")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.eval()


def bnb_swap(model: nn.Module, kind: str = "int8", threshold: float = 6.0,
             blocks: tuple[str, ...] = ("layers.",)) -> nn.Module:
    """``model`` with every nn.Linear of its blocks (names holding one of ``blocks``) made bitsandbytes' ``kind`` layer
    ("int8": Linear8bitLt, "nf4": Linear4bit), in eval mode; the head and embeddings stay as they are."""
    if kind not in ("int8", "nf4"):
        raise ValueError(f"kind must be 'int8' or 'nf4', got {kind!r}")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(b in name for b in blocks):
            new = bnb_int8_layer(module, threshold) if kind == "int8" else bnb_nf4_layer(module)
            parent, child = owner_of(model, name)
            setattr(parent, child, new)
    return model.eval()
