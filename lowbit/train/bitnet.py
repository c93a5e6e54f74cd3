"""Turn a transformers model's linear layers into b1.58 training layers, and trained ones into packed ones."""
from __future__ import annotations

from torch import nn

from lowbit.nn import BitLinear, TrainableBitLinear
from lowbit.nn.base import replace_module, tied_to_embeddings

KEEP = ("lm_head",)  # BitNet keeps the embedding and the output head in full precision


def to_bitnet(model: nn.Module, keep: tuple[str, ...] = KEEP) -> nn.Module:
    """Replace every nn.Linear of ``model`` (but those named in ``keep`` or tied to the embedding) by a
    TrainableBitLinear starting from its weight; in place, returns the model."""
    tied = tied_to_embeddings(model)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n.split(".")[-1] not in keep and id(m.weight) not in tied]
    if not names:
        raise ValueError("this model has no nn.Linear layers to train as b1.58")
    for name in names:
        replace_module(model, name, TrainableBitLinear.from_linear(model.get_submodule(name)))
    return model


def pack_bitnet(model: nn.Module) -> nn.Module:
    """Replace every TrainableBitLinear of ``model`` by its packed BitLinear (2 bits a weight); in place."""
    names = [n for n, m in model.named_modules() if isinstance(m, TrainableBitLinear)]
    if not names:
        raise ValueError("this model has no TrainableBitLinear layers to pack (train it with to_bitnet first)")
    for name in names:
        replace_module(model, name, model.get_submodule(name).pack())
    return model


def is_bitnet(model: nn.Module) -> bool:
    """Whether ``model`` holds b1.58 training layers."""
    return any(isinstance(m, TrainableBitLinear) for m in model.modules())


def packed_layers(model: nn.Module) -> list[BitLinear]:
    return [m for m in model.modules() if isinstance(m, BitLinear)]
