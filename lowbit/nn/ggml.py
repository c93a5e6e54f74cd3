"""BlockLinear: a weight in one of llama.cpp's block types (q4_0 ... iq4_nl, and the K-quants q4_k, q6_k), held in
the bytes GGUF stores, so that export writes it as it is; and BlockConfig, rounding onto those types."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowbit.config import BaseConfig
from lowbit.formats import ggml, kquants
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
        block_format(self.block_type)


BLOCK_TYPES = (*ggml.TYPES, *kquants.TYPES)
# What llama.cpp's quantizer writes where a K type's 256-weight super-blocks do not tile a row (llama-quant.cpp).
K_FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}


def block_format(name: str):
    """(the module with the layout: lowbit.formats.ggml or .kquants, the type) of block type ``name``."""
    if name in kquants.TYPES:
        return kquants, kquants.TYPES[name]
    if name in ggml.TYPES:
        return ggml, ggml.TYPES[name]
    raise ValueError(f"unknown block type {name!r}; choose from {', '.join(BLOCK_TYPES)}")


def check_rows(block_type: str, in_features: int):
    """The block type called ``block_type``; ValueError if it is unknown or its blocks do not tile rows of
    ``in_features`` weights."""
    _, t = block_format(block_type)
    if in_features % t.block:
        raise ValueError(f"{block_type} takes rows whose length is a multiple of {t.block}; this layer has "
                         f"{in_features} inputs")
    return t


def rows_type(block_type: str, in_features: int) -> str:
    """``block_type``, or llama.cpp's fallback type for it where its super-blocks do not tile ``in_features``."""
    _, t = block_format(block_type)
    return K_FALLBACK[block_type] if in_features % t.block and block_type in K_FALLBACK else block_type


class BlockLinear(DequantLinear):
    """y = x @ W^T with W in blocks of one llama.cpp type, stored as GGUF stores them: ``weight_blocks`` uint8
    [out, in / block * bytes per block] (lowbit/formats/ggml.py and kquants.py have each type's layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_type: str = "q4_0",
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        t = check_rows(block_type, in_features)
        self.block_type = block_type
        self.register_buffer("weight_blocks", torch.zeros(out_features, in_features // t.block * t.bytes,
                                                          dtype=torch.uint8))

    @classmethod
    def from_blocks(cls, blocks: "ggml.Blocks | kquants.KBlocks", bias: torch.Tensor | None,
                    compute_dtype: torch.dtype = torch.float32) -> "BlockLinear":
        """The layer holding ``blocks`` (a weight already on its type's grid)."""
        out_f, in_f = blocks.codes.shape
        layer = cls(in_f, out_f, bias is not None, blocks.type.name, compute_dtype)
        layer.weight_blocks = block_format(blocks.type.name)[0].pack(blocks)
        layer.copy_bias(bias)
        return layer

    @classmethod
    def from_linear(cls, module: nn.Module, block_type: str = "q4_0",
                    compute_dtype: torch.dtype = torch.float32) -> "BlockLinear":
        """ggml's reference rounding of an nn.Linear / Conv1D weight (K types: the weighted search, weights w^2)."""
        w = linear_weight(module).float()
        t = check_rows(block_type, w.shape[1])
        blocks = kquants.search(t, w) if block_type in kquants.TYPES else ggml.reference(t, w)
        return cls.from_blocks(blocks, module.bias, compute_dtype)

    def init_kwargs(self) -> dict:
        return {**super().init_kwargs(), "block_type": self.block_type}

    def blocks(self) -> "ggml.Blocks | kquants.KBlocks":
        """The codes and scales of the stored bytes."""
        fmt, t = block_format(self.block_type)
        return fmt.unpack(t, self.weight_blocks, self.in_features)

    def check_values(self) -> None:
        super().check_values()
        scale, m = self.blocks().per_weight()  # every byte pattern is a code; scales must be finite numbers
        check_range(scale, "weight_blocks (scales)")
        if m is not None:
            check_range(m, "weight_blocks (mins)")

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        w = self.blocks().dequantize().to(dtype)
        return w if out is None else out.copy_(w)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.block_type}"


_ROUNDING = {**{name: "rounded as ggml's reference quantizer does" + (" (IQ4_NL: a weighted scale search)"
                                                                      if t.levels else "")
                for name, t in ggml.TYPES.items()},
             **{name: f"super-blocks of 256, lowbit's weighted scale search (rows not a multiple of 256: "
                      f"{K_FALLBACK[name].upper()}, llama.cpp's fallback)" for name in kquants.TYPES}}


def _round_layer(module: nn.Module, c: BlockConfig) -> BlockLinear:
    return BlockLinear.from_linear(module, rows_type(c.block_type, linear_weight(module).shape[1]), c.compute_dtype)


register(Format(BlockConfig, BlockLinear, _round_layer,
                methods={name: Method({"block_type": name}, f"llama.cpp's {name.upper()} "
                                      f"({block_format(name)[1].bits_per_weight:g} bits/weight), {_ROUNDING[name]}")
                         for name in BLOCK_TYPES}))
