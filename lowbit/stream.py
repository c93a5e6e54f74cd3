"""quantize_checkpoint(src, dst, config): quantize a transformers safetensors folder tensor by tensor.

The model is built on the meta device (no weights); each tensor is read from the source when its turn comes in the
state dict, quantized if its layer is chosen, written to the destination's shards and freed. GPTQ and SpQR load one
transformer block at a time, keep only that block's calibration inputs, and free the block once written. What is
written equals, byte for byte, ``lowbit.save`` of ``lowbit.quantize`` of the model loaded in float32.
"""
from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lowbit.checkpoint import CheckpointError, Saving, assign, check_target, shard_limit
from lowbit.eval.memory import peak_rss_bytes
from lowbit.manifest import CONFIG_ERRORS
from lowbit.config import QuantConfig, config_from_name
from lowbit.registry import is_calibrated
from lowbit.nn.base import owner_of, replace_module
from lowbit.quantize import build_layer, check_calibration, check_config, eligible_layers, warn_post_training_ternary
from lowbit.shards import SafetensorsFolder, ShardError

__all__ = ["quantize_checkpoint"]


def empty_model(src: Path) -> nn.Module:
    """The transformers model of the folder ``src`` as ``from_pretrained(src, dtype=float32)`` builds it, its
    parameters on the meta device (buffers computed at construction, such as rotary frequencies, are real)."""
    import transformers
    from accelerate import init_empty_weights

    try:
        config = transformers.AutoConfig.from_pretrained(src)
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except CONFIG_ERRORS as e:
        raise CheckpointError(f"{src} holds no transformers config.json that describes a model "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    model.tie_weights()  # built on meta, the model's tied embedding and LM head are two Parameters until this
    model.config.dtype = torch.float32
    model.config._name_or_path = str(src)
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(src)
    except OSError:
        pass  # no generation_config.json: from_pretrained keeps the one made from the model's config
    return model.eval()


def _read(source: SafetensorsFolder, name: str) -> torch.Tensor:
    """The source's tensor ``name`` as the float32 model holds it (float tensors in float32)."""
    if name not in source:
        raise CheckpointError(f"{source.folder} has no tensor {name}, which the model needs")
    value = source.read(name)
    return value.float() if value.is_floating_point() else value


def _materialize(module: nn.Module, prefix: str, source: SafetensorsFolder) -> None:
    """Give ``module``'s parameters and persistent buffers (recursively) their values from the source."""
    for name, t in module.state_dict(keep_vars=True).items():
        if t.is_meta:  # not a buffer computed at construction, nor a tied weight already read
            assign(module, name, _read(source, f"{prefix}.{name}" if prefix else name))


def _value(model: nn.Module, name: str, source: SafetensorsFolder) -> torch.Tensor:
    """The state-dict entry ``name``: the model's own tensor where it has one (computed at build, or read), else read."""
    t = _tensor(model, name)
    return _read(source, name) if t.is_meta else t.detach()


def _to_meta(module: nn.Module) -> None:
    """Drop ``module``'s tensors (they are written): its parameters and buffers go back to the meta device, and
    the C heap gives freed pages back to the system (glibc keeps them otherwise: +50 MB RSS a block measured)."""
    module.to("meta")
    _trim_heap()


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, config: QuantConfig | str,
                        calibration: torch.Tensor | None = None, tokenizer=None, max_shard_size: int | str = "2GB",
                        progress: bool = True) -> dict:
    """Quantize the transformers safetensors folder ``src`` into the lowbit checkpoint ``dst`` without building the
    full-precision model; return stats (seconds, peak_rss_bytes, source_bytes, written_bytes).

    ``config`` and ``calibration`` are those of ``lowbit.quantize``; ``tokenizer`` is saved beside the model."""
    t0 = time.perf_counter()
    config = config_from_name(config) if isinstance(config, str) else config
    check_config(config)
    src = Path(src)
    dst = check_target(dst)
    limit = shard_limit(max_shard_size)
    if is_calibrated(config):
        check_calibration(config, calibration)
    try:
        source = SafetensorsFolder(src)
    except ShardError as e:
        raise CheckpointError(str(e)) from None
    with source:
        model = empty_model(src)
        # Names only: a reference to a layer kept here would keep its weight alive once read.
        chosen = [name for name, _ in eligible_layers(model, config)]
        if not chosen:
            raise ValueError("no nn.Linear or Conv1D layer to quantize (check the skip patterns)")
        with Saving(dst, limit) as saving:
            if is_calibrated(config):
                stats = _calibrated(model, config, set(chosen), calibration, source, saving, progress)
            else:
                warn_post_training_ternary(config)
                stats = _rtn(model, config, set(chosen), source, saving, progress)
            model.lowbit_config = config
            manifest = saving.commit(model, stats.pop("tied"), tokenizer)
    stats.update(seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(), source_bytes=source.nbytes(),
                 written_bytes=sum(s["bytes"] for s in manifest["shards"]))
    return stats


def _entries(model: nn.Module):
    """(name, tensor, owner module name, first name of the same tensor or None) in state-dict order; ties by
    identity, as the model's own tie of embedding and LM head shares one Parameter."""
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        yield name, t, name.rpartition(".")[0], first.get(id(t))
        first.setdefault(id(t), name)


def _rtn(model: nn.Module, config: QuantConfig, layers: set[str], source: SafetensorsFolder,
         saving: Saving, progress: bool) -> dict:
    """Round-to-nearest methods: each chosen layer is read, quantized and written alone."""
    tied, done = {}, set()
    entries = list(_entries(model))
    bar = tqdm(total=sum(1 for n, _, o, f in entries if f is None and (o not in layers or n == f"{o}.weight")),
               desc="quantizing (streamed)", unit="tensor", disable=None if progress else True)
    for name, t, owner, first in entries:
        if first is not None:
            tied[name] = first
            continue
        if owner in layers:
            if owner in done:
                continue
            done.add(owner)
            module = model.get_submodule(owner)
            _materialize(module, owner, source)
            try:
                with torch.no_grad():
                    layer = build_layer(module, config)
            except (ValueError, TypeError, RuntimeError) as e:
                raise type(e)(f"layer {owner}: {e} (nothing was written)") from e
            for k, v in layer.state_dict().items():
                saving.add(f"{owner}.{k}", v)
            replace_module(model, owner, layer.to("meta"))
            del layer, module
            _trim_heap()
        else:
            saving.add(name, _value(model, name, source))
        bar.update()
    bar.close()
    return {"tied": tied, "layers": len(done)}


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, attr = owner_of(model, name)
    return owner._parameters[attr] if attr in owner._parameters else owner._buffers[attr]


def _calibrated(model: nn.Module, config, chosen: set[str], calibration: torch.Tensor, source: SafetensorsFolder,
                saving: Saving, progress: bool) -> dict:
    """GPTQ / SpQR: the tensors before the blocks are read and kept (the forward to block 0 needs them), each block
    is read, calibrated, written and dropped in turn, then the tensors after the blocks are written."""
    from lowbit.calibrate.run import calibrate
    from lowbit.calibrate.sequential import find_blocks

    prefix, blocks = find_blocks(model)
    entries = list(_entries(model))
    in_block = [n.startswith(prefix + ".") for n, *_ in entries]
    if True not in in_block:
        raise ValueError(f"the blocks {prefix} hold no tensors")
    first_b, last_b = in_block.index(True), len(in_block) - 1 - in_block[::-1].index(True)
    if not all(in_block[first_b:last_b + 1]):
        raise NotImplementedError(f"{type(model).__name__}'s state dict interleaves its blocks with other tensors: "
                                  "load the model and use lowbit.quantize instead")
    tied = {}

    def write(items):
        for name, _, _, first in items:
            if first is not None:
                tied[name] = first
            else:
                saving.add(name, _value(model, name, source))

    # Before the blocks: read into the model (the calibration forward uses them), then written.
    for name, t, owner, first in entries[:first_b]:
        if first is None and t.is_meta:
            assign(model, name, _value(model, name, source))
    write(entries[:first_b])

    def before(b: int, block: nn.Module) -> None:
        _materialize(block, f"{prefix}.{b}", source)

    def after(b: int, block: nn.Module) -> None:
        for k, v in block.state_dict().items():
            saving.add(f"{prefix}.{b}.{k}", v)
        _to_meta(block)

    stats = calibrate(model, config, calibration, lambda name: name not in chosen, progress,
                      before_block=before, after_block=after)
    write(entries[last_b + 1:])
    stats["tied"] = tied
    return stats
