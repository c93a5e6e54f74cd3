"""Quantized token embeddings: the [vocab, dim] table stored as the rows of a lowbit layer, read row by row.

The rows layer is an ordinary lowbit linear layer over the same weight (vocab outputs, dim inputs), so a model
whose LM head is tied to its embeddings keeps them tied: the head *is* the rows layer, and one copy is stored.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.base import DequantLinear, QuantLinear, linear_weight
from lowbit.nn.int8 import Int8Linear
from lowbit.nn.intn import IntLinear
from lowbit.registry import register_layer

EMBEDDING_FORMATS = ("float32", "bfloat16", "int8", "int4")  # float32: left as it is
INT4_ROW_GROUP = 64  # 4-bit rows: an fp16 scale and a uint8 zero per 64 weights (4.375 bits a weight)


@register_layer
class HalfLinear(DequantLinear):
    """y = x @ W^T + b with W stored in bfloat16: 16 bits a weight, for layers (LM heads) worth more than 8."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.register_buffer("weight_bf16", torch.zeros(out_features, in_features, dtype=torch.bfloat16))

    @classmethod
    def from_linear(cls, module: nn.Module, compute_dtype: torch.dtype = torch.float32) -> "HalfLinear":
        w = linear_weight(module)
        layer = cls(w.shape[1], w.shape[0], module.bias is not None, compute_dtype)
        layer.weight_bf16 = w.to(torch.bfloat16).contiguous()
        layer.copy_bias(module.bias)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight_bf16.to(dtype) if out is None else out.copy_(self.weight_bf16)


    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_bf16[ids].float()


def rows_of(layer: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of ``layer``'s weight in float32, rebuilt from the stored rows alone (``QuantLinear.rows``)."""
    return layer.rows(ids)


def _rows_layer(fmt: str, dim: int, vocab: int) -> QuantLinear:
    if fmt == "bfloat16":
        return HalfLinear(dim, vocab, bias=False)
    if fmt == "int8":
        return Int8Linear(dim, vocab, bias=False, weight_only=True)
    if fmt == "int4":
        return IntLinear(dim, vocab, bias=False, bits=4, group_size=INT4_ROW_GROUP)
    raise ValueError(f"embedding format must be one of {', '.join(EMBEDDING_FORMATS[1:])} (or float32 to keep it), "
                     f"got {fmt!r}")


@register_layer
class QuantEmbedding(nn.Module):
    """nn.Embedding whose table is stored in bfloat16, int8 rows (absmax per token) or 4-bit rows; outputs float32."""

    def __init__(self, num_embeddings: int, embedding_dim: int, format: str = "int8") -> None:
        super().__init__()
        if format == "int4" and embedding_dim % 2:
            raise ValueError(f"4-bit rows need an even embedding size (two codes a byte), got {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.format = num_embeddings, embedding_dim, format
        self.rows = _rows_layer(format, embedding_dim, num_embeddings)
        self.compute_dtype = torch.float32

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, format: str) -> "QuantEmbedding":
        """The quantized copy of ``embedding``'s table."""
        vocab, dim = embedding.weight.shape
        q = cls(vocab, dim, format)
        stand_in = nn.Linear(dim, vocab, bias=False, device="meta")
        stand_in.weight = embedding.weight  # the table as a linear weight [vocab, dim]: no copy
        with torch.no_grad():
            if format == "bfloat16":
                q.rows = HalfLinear.from_linear(stand_in)
            elif format == "int8":
                q.rows = Int8Linear.from_linear(stand_in, weight_only=True)
            else:
                q.rows = IntLinear.from_linear(stand_in, bits=4, group_size=INT4_ROW_GROUP)
        return q

    def init_kwargs(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "format": self.format}

    def stored_bits(self) -> int:
        return self.rows.stored_bits()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point():
            raise TypeError(f"QuantEmbedding takes token ids (integers), got {ids.dtype}")
        return rows_of(self.rows, ids.reshape(-1)).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}"
