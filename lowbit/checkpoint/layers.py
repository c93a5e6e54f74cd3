"""The model side of a checkpoint: lowbit layers as specs (type and constructor arguments) and back, and the checks
that a model's tensors are what its layers and the files say.

``layer_specs`` describes the lowbit layers of a model; ``swap_layers`` rebuilds them empty (on the meta device) in a
model of the same architecture; ``layer_layout``, ``check_shard_headers``, ``check_complete`` and ``check_layers``
hold what a reader fills in to that layout; the float buffers a state dict leaves out keep their dtypes through
``unsaved_buffer_dtypes`` / ``restore_buffer_dtypes``. Every check here reads headers or tensors the model already
holds: nothing is copied.
"""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.config import DTYPES
from lowbit.manifest import CheckpointError
from lowbit.nn import Int8Linear, IntLinear, Linear4bit, QuantEmbedding, QuantLinear
from lowbit.registry import layer_types
from lowbit.nn.base import check_range, is_linear_like, linear_weight, owner_of

# Every layer a checkpoint may name: the registry's live view, so a format registered after this import loads too.
LAYER_TYPES = layer_types()
_FLOAT_DTYPES = {**DTYPES, "float64": torch.float64}


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """Each lowbit layer's type and constructor arguments, by module name: what rebuilds the layers empty."""
    specs, embeddings = {}, []
    # Every name of a module shared by two (a head that is the embedding's rows layer): each place is rebuilt.
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantEmbedding):
            embeddings.append(name + ".")
        elif not isinstance(m, QuantLinear) or any(name.startswith(e) for e in embeddings):
            continue  # the rows of an embedding are rebuilt by the embedding
        specs[name] = {"type": type(m).__name__, **m.init_kwargs()}
    return specs


def current_spec(spec: dict) -> tuple[type | None, dict]:
    """A saved layer spec as today's layers take it: (class or None if unknown, constructor arguments). Specs
    written by older lowbit say what they meant then: an Int8Linear without "activations" had absmax ones (zero-point
    ones came later); a Linear4bit of quant_type "int4" is the IntLinear of 4-bit groups that it stored, with float32
    scales and zeros under the same tensor names."""
    spec = dict(spec)
    cls = LAYER_TYPES.get(spec.pop("type", None))
    if cls is Int8Linear:
        spec.setdefault("activations", "absmax")
    if cls is Linear4bit and spec.get("quant_type") == "int4":
        kept = {k: spec[k] for k in ("in_features", "out_features", "bias", "compute_dtype") if k in spec}
        cls, spec = IntLinear, {**kept, "bits": 4, "group_size": spec.get("blocksize", 64), "zero_dtype": "float32",
                                "scale_dtype": "float32"}
    return cls, spec


def swap_layers(model: nn.Module, layers: dict) -> None:
    """Put an empty lowbit layer (on the meta device) in place of each module ``layers`` names, as its spec says."""
    for name, saved in layers.items():
        cls, spec = current_spec(saved)
        if cls is None:
            raise CheckpointError(f"layer {name}: unknown lowbit layer type; known: {', '.join(LAYER_TYPES)}")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint quantized a layer {name} that this model does not have") from None
        if cls is QuantEmbedding:
            _check_embedding(name, old, spec)
        elif isinstance(old, QuantLinear):
            if type(old) is not cls or old.init_kwargs() != {k: spec.get(k) for k in old.init_kwargs()}:
                raise CheckpointError(f"layer {name} is already a different lowbit layer")
        elif is_linear_like(old):
            out_f, in_f = linear_weight(old).shape
            if (in_f, out_f) != (spec.get("in_features"), spec.get("out_features")):
                raise CheckpointError(f"shape mismatch at {name}: the checkpoint has {spec['in_features']} -> "
                                      f"{spec['out_features']} features, the model {in_f} -> {out_f}")
        else:
            raise CheckpointError(f"layer {name} is a {type(old).__name__} in this model, not a linear layer")
        if "compute_dtype" in spec:
            spec["compute_dtype"] = DTYPES[spec["compute_dtype"]]
        try:
            with torch.device("meta"):
                new = cls(**spec)
        except (ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"lowbit.json: layers[{name!r}] cannot be built: {e}") from None
        parent, child = owner_of(model, name)
        setattr(parent, child, new)


def _check_embedding(name: str, old: nn.Module, spec: dict) -> None:
    if isinstance(old, QuantEmbedding):
        if old.init_kwargs() != {k: spec.get(k) for k in old.init_kwargs()}:
            raise CheckpointError(f"{name} is already a different lowbit embedding")
    elif isinstance(old, nn.Embedding):
        if tuple(old.weight.shape) != (spec.get("num_embeddings"), spec.get("embedding_dim")):
            raise CheckpointError(f"shape mismatch at {name}: the checkpoint has {spec.get('num_embeddings')} x "
                                  f"{spec.get('embedding_dim')} embeddings, the model {tuple(old.weight.shape)}")
    else:
        raise CheckpointError(f"{name} is a {type(old).__name__} in this model, not an embedding")


def layer_layout(model: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of every tensor of the model's lowbit layers, by state-dict name: what their constructors
    made (take it right after the layers are built, before any tensor of a file replaces theirs)."""
    return {f"{name}.{attr}" if name else attr: (t.dtype, tuple(t.shape))
            for name, m in model.named_modules() if isinstance(m, QuantLinear)
            for attr, t in m.named_buffers(recurse=False) if t is not None}


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}


def check_shard_headers(files: list[str | os.PathLike], model: nn.Module,
                        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> set[str]:
    """The names of the tensors the safetensors ``files`` hold, read from their headers alone; CheckpointError for a
    tensor ``model`` does not have, or of another shape than its own, or of another dtype than ``layout`` gives its
    lowbit layers: for readers that cast or skip what does not fit (transformers casts floats to the model's dtype,
    which would hide a float16 scale where the layer stores float32)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    names = set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name not in shapes:
                        raise CheckpointError(f"the checkpoint has a tensor {name} that this model does not have")
                    t = f.get_slice(name)
                    dtype = layout.get(name, (None,))[0]
                    if tuple(t.get_shape()) != shapes[name] or (dtype is not None and
                                                               t.get_dtype() != _SAFETENSORS_DTYPES.get(dtype)):
                        want = f"{dtype} {shapes[name]}" if dtype is not None else f"shape {shapes[name]}"
                        raise CheckpointError(f"{name}: the checkpoint has {t.get_dtype()} {tuple(t.get_shape())}, "
                                              f"the model expects {want}")
                    names.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path} cannot be read ({e}): the file is damaged") from None
    return names


def check_complete(model: nn.Module, names: set[str]) -> None:
    """Raise CheckpointError unless every tensor of ``model`` was read under one of its names (tied tensors, one
    object under several names, once): for readers that fill what a file lacks with fresh memory."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    missing = sorted(group[0] for group in groups.values() if not names.intersection(group))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")


def check_layers(model: nn.Module, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
    """Raise CheckpointError unless every lowbit layer of a loaded model holds tensors of the dtypes and shapes in
    ``layout`` and values its format can hold (``QuantLinear.check_values``): codes in range, finite constants,
    scales of the right sign; and every other float tensor finite. Every loader runs it, so no kernel meets a value
    the reference path would refuse."""
    tensors = model.state_dict(keep_vars=True)
    for name, (dtype, shape) in layout.items():
        t = tensors.get(name)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            got = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise CheckpointError(f"{name}: the checkpoint has {got}, the layer expects {dtype} {shape}")
    checked = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            try:
                m.check_values()
            except ValueError as e:
                raise CheckpointError(f"layer {name}: {e}: the checkpoint is damaged") from None
            checked.update(id(b) for b in m.buffers())
    for name, t in tensors.items():  # norms, embeddings, layers left in float: NaN there is no weight either
        if t.is_floating_point() and not t.is_meta and id(t) not in checked:
            try:
                check_range(t, name)
            except ValueError as e:
                raise CheckpointError(f"{e}: the checkpoint is damaged") from None


def restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    """Cast the float buffers a state dict leaves out back to the dtypes they were saved in (``unsaved_buffer_dtypes``)."""
    buffers = dict(model.named_buffers())
    for name, dtype in dtypes.items():
        if name in buffers and buffers[name].is_floating_point() and dtype in _FLOAT_DTYPES:
            module, attr = owner_of(model, name)
            module._buffers[attr] = buffers[name].to(_FLOAT_DTYPES[dtype])


def unsaved_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """dtype names of the float buffers a state dict leaves out (rotary inv_freq, ...): ``model.to(bf16)`` casts
    them too, and a rebuilt model must compute with the same ones to give the same outputs."""
    saved = set(model.state_dict())
    return {name: str(b.dtype).removeprefix("torch.") for name, b in model.named_buffers()
            if name not in saved and b.is_floating_point()}
