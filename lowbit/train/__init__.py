"""Training: LoRA adapters on a frozen low-bit base (QLoRA, LoftQ, merging), and small models from scratch in
fp32, bf16 or BitNet b1.58 (``to_bitnet``, ``pack_bitnet``, the ``pretrain`` harness)."""
from lowbit.train.bitnet import pack_bitnet, to_bitnet
from lowbit.train.loftq import loftq, loftq_init
from lowbit.train.lora import LoraQuantLinear, register_with_peft
from lowbit.train.merge import merge_and_requantize, merge_to_full_precision
from lowbit.train.prepare import prepare_for_training

__all__ = ["LoraQuantLinear", "loftq", "loftq_init", "merge_and_requantize", "merge_to_full_precision",
           "pack_bitnet", "prepare_for_training", "register_with_peft", "to_bitnet"]
