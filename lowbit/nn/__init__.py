"""Quantized layers: drop-in replacements for nn.Linear and transformers' Conv1D."""
from lowbit.nn.base import QuantLinear
# Each format registers itself as its module is imported (lowbit/registry.py): this order is the order of the
# method names in help and errors.
from lowbit.nn.int8 import Int8Linear
from lowbit.nn.linear4bit import Linear4bit
from lowbit.nn.bitlinear import BitLinear
from lowbit.nn.intn import IntLinear
from lowbit.nn.spqr import SpQRLinear
from lowbit.nn.ggml import BlockLinear
from lowbit.nn.bitlinear_train import TrainableBitLinear
from lowbit.nn.switchback import StableEmbedding, SwitchBackLinear, to_switchback

__all__ = ["QuantLinear", "Int8Linear", "Linear4bit", "BitLinear", "TrainableBitLinear", "IntLinear", "SpQRLinear", "BlockLinear", "SwitchBackLinear",
           "StableEmbedding", "to_switchback"]
from lowbit.nn.embedding import HalfLinear, QuantEmbedding  # noqa: E402

__all__ += ["HalfLinear", "QuantEmbedding"]
