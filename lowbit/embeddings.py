"""lowbit.quantize_embeddings(model, format): the token embeddings (and a head tied to them) in bf16, int8 or 4-bit rows."""
from __future__ import annotations

from torch import nn

from lowbit.nn import QuantLinear
from lowbit.nn.embedding import EMBEDDING_FORMATS, QuantEmbedding


def embedding_pair(model: nn.Module) -> tuple[nn.Module, nn.Module | None, bool]:
    """(input embedding, output head or None, whether the head is tied to the embedding) of a transformers model."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings) to quantize")
    head = get_out() if callable(get_out) else None
    if isinstance(emb, QuantEmbedding):
        return emb, head, head is emb.rows
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    return emb, head, tied


def quantize_embeddings(model: nn.Module, format: str) -> nn.Module:
    """Store the model's token embeddings in ``format`` (float32: as they are); a head tied to them follows."""
    if format not in EMBEDDING_FORMATS:
        raise ValueError(f"embedding format must be one of {', '.join(EMBEDDING_FORMATS)}, got {format!r}")
    if format == "float32":
        return model
    emb, head, tied = embedding_pair(model)
    if isinstance(emb, QuantEmbedding):
        raise ValueError(f"the embeddings are {emb.format} already; load the full-precision model to choose again")
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"the input embeddings are a {type(emb).__name__}, not an nn.Embedding")
    if type(emb).forward is not nn.Embedding.forward:  # Gemma's scaled rows: a table alone would lose the scale
        raise ValueError(f"the input embeddings are a {type(emb).__name__}, whose forward does more than look up "
                         "rows (a scale); lowbit stores plain nn.Embedding tables only")
    if tied and isinstance(head, QuantLinear):
        raise ValueError("the LM head is quantized already")
    q = QuantEmbedding.from_embedding(emb, format)
    model.set_input_embeddings(q)
    if tied:  # the head is the rows layer itself: still one table, stored once
        model.set_output_embeddings(q.rows)
    return model
