"""BlockLinear: a weight in one of llama.cpp's block types (q4_0 ... iq4_nl), held in the bytes GGUF stores, so that
export writes it as it is; and BlockConfig, ggml's reference rounding onto those types."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowbit.config import BaseConfig
from lowbit.formats import ggml
from lowbit.nn.base import DequantLinear, check_range, linear_weight
from lowbit.registry import Format, Method, register


@dataclass
class BlockConfig(BaseConfig):
    """llama.cpp's block types of 32 weights with an fp16 scale (and min), rounded as ggml's reference quantizer
    rounds (the same bytes as ``gguf.quantize`` and llama.cpp without an importance matrix; IQ4_NL, which has no
    plain rounding, by lowbit's weighted scale search)."""

    method: ClassVar[str] = "ggml"  # its name in JSON

    block_type: str = "q4_0"
    compute_dtype: torch.dtype = torch.float32

    def check(self) -> None:
        ggml.block_type(self.block_type)


def check_rows(block_type: str, in_features: int) -> ggml.BlockType:
    """The block type called ``block_type``; ValueError if it is unknown or its blocks do not tile rows of
    ``in_features`` weights."""
    t = ggml.block_type(block_type)
    if in_features % ggml.BLOCK:
        raise ValueError(f"{block_type} takes rows whose length is a multiple of {ggml.BLOCK}; this layer has "
                         f"{in_features} inputs")
    return t


class BlockLinear(DequantLinear):
    """y = x @ W^T with W in blocks of one llama.cpp type, stored as GGUF stores them: ``weight_blocks`` uint8
    [out, in / 32 * bytes per block] (lowbit/formats/ggml.py has each type's layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_type: str = "q4_0",
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        t = check_rows(block_type, in_features)
        self.block_type = block_type
        self.register_buffer("weight_blocks", torch.zeros(out_features, in_features // ggml.BLOCK * t.bytes,
                                                          dtype=torch.uint8))

    @classmethod
    def from_blocks(cls, blocks: ggml.Blocks, bias: torch.Tensor | None,
                    compute_dtype: torch.dtype = torch.float32) -> "BlockLinear":
        """The layer holding ``blocks`` (a weight already on its type's grid)."""
        out_f, in_f = blocks.codes.shape
        layer = cls(in_f, out_f, bias is not None, blocks.type.name, compute_dtype)
        layer.weight_blocks = ggml.pack(blocks)
        layer.copy_bias(bias)
        return layer

    @classmethod
    def from_linear(cls, module: nn.Module, block_type: str = "q4_0",
                    compute_dtype: torch.dtype = torch.float32) -> "BlockLinear":
        """ggml's reference rounding of an nn.Linear / Conv1D weight."""
        w = linear_weight(module).float()
        check_rows(block_type, w.shape[1])
        return cls.from_blocks(ggml.reference(ggml.block_type(block_type), w), module.bias, compute_dtype)

    def init_kwargs(self) -> dict:
        return {**super().init_kwargs(), "block_type": self.block_type}

    def blocks(self) -> ggml.Blocks:
        """The codes and scales of the stored bytes."""
        return ggml.unpack(ggml.block_type(self.block_type), self.weight_blocks, self.in_features)

    def check_values(self) -> None:
        super().check_values()
        b = self.blocks()  # every byte pattern is a code; scales must be finite numbers
        check_range(b.d, "weight_blocks (scales)")
        if b.m is not None:
            check_range(b.m, "weight_blocks (mins)")

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        w = self.blocks().dequantize().to(dtype)
        return w if out is None else out.copy_(w)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.block_type}"


register(Format(BlockConfig, BlockLinear,
                lambda module, c: BlockLinear.from_linear(module, c.block_type, c.compute_dtype),
                methods={name: Method({"block_type": name}, f"llama.cpp's {name.upper()} ({t.bits_per_weight:g} "
                                      "bits/weight), rounded as ggml's reference quantizer does"
                                      + (" (IQ4_NL: a weighted scale search)" if t.levels else ""))
                         for name, t in ggml.TYPES.items()}))
