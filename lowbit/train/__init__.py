"""Training on a frozen low-bit base: LoRA adapters (PEFT) on lowbit layers, QLoRA preparation, LoftQ, merging."""
from lowbit.train.loftq import loftq, loftq_init
from lowbit.train.lora import LoraQuantLinear, register_with_peft
from lowbit.train.merge import merge_and_requantize, merge_to_full_precision
from lowbit.train.prepare import prepare_for_training

__all__ = ["LoraQuantLinear", "loftq", "loftq_init", "merge_and_requantize", "merge_to_full_precision",
           "prepare_for_training", "register_with_peft"]
