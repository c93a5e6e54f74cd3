"""PEFT's LoRA on lowbit layers: y = base(x) + B(A(dropout(x))) * scaling, base frozen and quantized.

PEFT picks a LoRA layer class per base-layer type; ``register_with_peft`` adds lowbit's ``QuantLinear`` to that
choice through PEFT's custom-module hook, so ``get_peft_model(model, LoraConfig(...))`` and
``PeftModel.from_pretrained(model, dir)`` work on a lowbit model unchanged, and adapters save in PEFT's format.
"""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lowbit.nn import QuantLinear


class LoraQuantLinear(nn.Module, LoraLayer):
    """A LoRA adapter (PEFT conventions: lora_A, lora_B, scaling per adapter) beside a frozen lowbit layer."""

    def __init__(self, base_layer: QuantLinear, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        if getattr(config, "use_dora", False):
            raise ValueError("DoRA is not supported on lowbit layers (it needs the weight's norm per step)")
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
            result = result + (h * self.scaling[name]).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The [out, in] weight this adapter adds: B @ A * scaling (float32)."""
        return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("a quantized base cannot absorb an adapter in place: use "
                                  "lowbit.train.merge_and_requantize(model) or merge_to_full_precision(model)")

    def unmerge(self) -> None:
        raise NotImplementedError("lowbit LoRA layers are never merged in place")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


_original_create = LoraModel._create_new_module


def _create_new_module(lora_config, adapter_name, target, **kwargs):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QuantLinear):
        # PEFT's own extension point for layer types it does not know, filled in for the caller's config.
        lora_config._register_custom_module({QuantLinear: LoraQuantLinear})
    return _original_create(lora_config, adapter_name, target, **kwargs)


def register_with_peft() -> None:
    """Make PEFT's LoRA wrap lowbit layers with ``LoraQuantLinear`` (idempotent; done on importing this module, which
    ``import lowbit`` arranges as soon as peft is imported: lowbit.interop.hf_hook)."""
    LoraModel._create_new_module = staticmethod(_create_new_module)


register_with_peft()
