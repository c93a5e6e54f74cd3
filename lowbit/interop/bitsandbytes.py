"""bitsandbytes 4-bit checkpoints: the state-dict layout transformers writes for ``load_in_4bit`` models.

Per quantized linear layer ``p``: ``p.weight`` (packed uint8, [n/2, 1]), ``p.weight.absmax`` (float32;
uint8 codes under double quantization), ``p.weight.quant_map`` (the 16 code values), with double
quantization ``p.weight.nested_absmax`` and ``p.weight.nested_quant_map``, and
``p.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): a uint8 tensor holding UTF-8 JSON with
quant_type, blocksize, dtype, shape and the nested blocksize, dtype and offset. Neither direction
needs bitsandbytes installed.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.functional.blockwise import DOUBLE_QUANT_BLOCKSIZE
from lowbit.checkpoint import check_layers
from lowbit.jsonfile import JSONFileError, loads_bounded
from lowbit.manifest import CONFIG_ERRORS, CheckpointError
from lowbit.nn import Linear4bit, QuantLinear
from lowbit.nn.base import owner_of

STATE_PREFIX = "weight.quant_state.bitsandbytes__"
# bitsandbytes (0.50), imported on a CPU with AVX512_BF16, logs that it could not fetch an optional kernel from the
# Hugging Face Hub package `kernels` ("Failed to load CPU gemm_4bit_forward from kernels-community ... pip install
# kernels"). Nothing fails: it runs its own fused kernel instead. Whatever imports it (lowbit, peft, transformers),
# the line lands in lowbit's output and reads like a lowbit error, so lowbit drops that one record.
_KERNEL_LOGGER, _KERNEL_NOTICE = "bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"


def _not_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_KERNEL_NOTICE)


def quiet_kernel_notice() -> None:
    """Keep bitsandbytes' import-time notice about the optional ``kernels`` package out of the output (call it
    before bitsandbytes is imported; calling it again does nothing)."""
    logger = logging.getLogger(_KERNEL_LOGGER)
    if _not_kernel_notice not in logger.filters:
        logger.addFilter(_not_kernel_notice)


def _pack_json(d: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: torch.Tensor) -> dict:
    try:
        meta = loads_bounded(bytes(t.to(torch.uint8).reshape(-1).tolist()), "the bitsandbytes quant_state tensor")
    except JSONFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"the bitsandbytes quant_state must be a JSON object, got {type(meta).__name__}")
    return meta


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def layer_to_bnb(layer: Linear4bit) -> dict[str, torch.Tensor]:
    """One Linear4bit (nf4/fp4) as bitsandbytes' state-dict entries, keys relative to the layer."""
    if not isinstance(layer, Linear4bit) or layer.quant_type not in ("nf4", "fp4"):
        raise TypeError("only nf4/fp4 Linear4bit layers have a bitsandbytes layout")
    meta = {"quant_type": layer.quant_type, "blocksize": layer.blocksize, "dtype": "float32",
            "shape": [layer.out_features, layer.in_features]}
    out = {"weight": layer.weight_packed.reshape(-1, 1).clone(), "weight.quant_map": layer.weight_code.clone()}
    if layer.double_quant:
        out["weight.absmax"] = layer.weight_nested_codes.clone()
        out["weight.nested_absmax"] = layer.weight_nested_absmax.clone()
        out["weight.nested_quant_map"] = layer.weight_nested_code.clone()
        meta.update(nested_blocksize=DOUBLE_QUANT_BLOCKSIZE, nested_dtype="float32",
                    nested_offset=float(layer.weight_nested_offset))
    else:
        out["weight.absmax"] = layer.weight_absmax.clone()
    out[STATE_PREFIX + layer.quant_type] = _pack_json(meta)
    if layer.bias is not None:
        out["bias"] = layer.bias.clone()
    return out


def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if t.dtype != dtype or t.numel() != numel:
        raise CheckpointError(f"{name}: expected {dtype} with {numel} elements, got {t.dtype} {tuple(t.shape)}")
    return t.reshape(-1).clone()


def layer_from_bnb(state: dict[str, torch.Tensor], compute_dtype: torch.dtype = torch.float32,
                   prefix: str = "") -> Linear4bit:
    """A Linear4bit holding exactly the data of one bitsandbytes layer's state-dict entries (keys relative to it)."""
    keys = [k for k in state if k.startswith(STATE_PREFIX)]
    if len(keys) != 1:
        raise CheckpointError(f"{prefix}: expected one {STATE_PREFIX}nf4|fp4 entry, found {len(keys)}")
    meta = _unpack_json(state[keys[0]])
    quant_type, blocksize, shape = meta.get("quant_type"), meta.get("blocksize"), meta.get("shape")
    if not isinstance(quant_type, str) or quant_type not in ("nf4", "fp4") or keys[0] != STATE_PREFIX + quant_type:
        raise CheckpointError(f"{prefix}: unsupported bitsandbytes quant_type {quant_type!r}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_positive_int(s) for s in shape)):
        raise CheckpointError(f"{prefix}: quant_state shape must be [out, in], got {shape!r}")
    if not _positive_int(blocksize) or blocksize % 2:
        raise CheckpointError(f"{prefix}: quant_state blocksize must be a positive even integer, got {blocksize!r}")
    nested = "weight.nested_absmax" in state
    if nested and meta.get("nested_blocksize") != DOUBLE_QUANT_BLOCKSIZE:
        raise CheckpointError(f"{prefix}: nested blocksize {meta.get('nested_blocksize')} (lowbit reads {DOUBLE_QUANT_BLOCKSIZE})")
    offset = meta.get("nested_offset")
    if nested and (isinstance(offset, bool) or not isinstance(offset, (int, float)) or offset != offset):
        raise CheckpointError(f"{prefix}: quant_state nested_offset must be a number, got {offset!r}")
    needed = ["weight", "weight.quant_map", "weight.absmax"] + (["weight.nested_quant_map"] if nested else [])
    lacking = [k for k in needed if k not in state]
    if lacking:
        raise CheckpointError(f"{prefix}: the bitsandbytes layer lacks {', '.join(prefix + k for k in lacking)}")
    out_f, in_f = shape
    bias = state.get("bias")
    n, nblocks = in_f * out_f, -(-in_f * out_f // blocksize)
    # The shape in the JSON must agree with the data before anything is built from it.
    packed = _expect(f"{prefix}weight", state["weight"], torch.uint8, -(-n // 2))
    with torch.device("meta"):
        layer = Linear4bit(in_f, out_f, bias is not None, quant_type, blocksize, nested, compute_dtype)
    layer.weight_packed = packed
    layer.weight_code = _expect(f"{prefix}weight.quant_map", state["weight.quant_map"], torch.float32, 16)
    if nested:
        layer.weight_nested_codes = _expect(f"{prefix}weight.absmax", state["weight.absmax"], torch.uint8, nblocks)
        layer.weight_nested_absmax = _expect(f"{prefix}weight.nested_absmax", state["weight.nested_absmax"], torch.float32,
                                             -(-nblocks // DOUBLE_QUANT_BLOCKSIZE))
        layer.weight_nested_code = _expect(f"{prefix}weight.nested_quant_map", state["weight.nested_quant_map"],
                                           torch.float32, 256)
        layer.weight_nested_offset = torch.tensor(float(meta["nested_offset"]))
    else:
        layer.weight_absmax = _expect(f"{prefix}weight.absmax", state["weight.absmax"], torch.float32, nblocks)
    if bias is not None:
        if bias.numel() != out_f or not bias.is_floating_point():
            raise CheckpointError(f"{prefix}bias: expected {out_f} elements, got {tuple(bias.shape)}")
        layer.bias = bias.detach().float().reshape(-1).clone()
    return layer


def to_bnb_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each nf4/fp4 Linear4bit in bitsandbytes' layout; other tensors as they are."""
    out, seen = {}, set()
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in quantized.items():
        if not isinstance(m, Linear4bit) or m.quant_type not in ("nf4", "fp4"):
            raise TypeError(f"{name} is {type(m).__name__} ({getattr(m, 'quant_type', '')}): bitsandbytes' 4-bit layout "
                            "holds only nf4/fp4 Linear4bit layers")
        out.update({f"{name}.{k}": v for k, v in layer_to_bnb(m).items()})
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quantized:
            continue
        ptr = (t.data_ptr(), tuple(t.shape))
        if ptr in seen:  # a tied weight: transformers re-ties it on load
            continue
        seen.add(ptr)
        out[key] = t.detach().contiguous()
    return out


def from_bnb_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                        compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Fill ``model`` (built full-precision or on the meta device) from a bitsandbytes 4-bit state dict."""
    prefixes = {k[: k.index(STATE_PREFIX) - 1] for k in state_dict if STATE_PREFIX in k}
    for prefix in sorted(prefixes):
        own = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
        own = {k: v for k, v in own.items() if k.startswith("weight") or k == "bias"}
        try:
            old = model.get_submodule(prefix)
        except AttributeError:
            raise CheckpointError(f"the state dict quantizes {prefix}, which this model does not have") from None
        layer = layer_from_bnb(own, compute_dtype, prefix + ".")
        in_f = getattr(old, "in_features", None)
        if in_f is not None and (in_f, old.out_features) != (layer.in_features, layer.out_features):
            raise CheckpointError(f"shape mismatch at {prefix}: state dict {layer.out_features}x{layer.in_features}, "
                             f"model {old.out_features}x{in_f}")
        parent, child = owner_of(model, prefix)
        setattr(parent, child, layer)
    rest = {k: v for k, v in state_dict.items() if k.rpartition(".")[0] not in prefixes and not
            any(k.startswith(p + ".weight.") for p in prefixes)}
    try:
        _, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    except RuntimeError as e:  # shapes that do not fit
        raise CheckpointError(f"the state dict does not fit this model: {str(e).strip().splitlines()[-1].strip()}") from None
    if unexpected:
        raise CheckpointError(f"the state dict has tensors this model lacks, e.g. {unexpected[:3]}")
    if hasattr(model, "tie_weights"):  # tied weights are stored once; the model ties them again
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"the state dict lacks tensors this model needs, e.g. {missing[:3]}")
    check_layers(model, {})
    return model.eval()


def save_bnb_checkpoint(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a transformers model with lowbit NF4/FP4 layers as a bitsandbytes ``load_in_4bit`` checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("the model has no lowbit Linear4bit layer to export")
    first = layers[0]
    model.config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type, "bnb_4bit_use_double_quant": first.double_quant,
        "bnb_4bit_compute_dtype": str(first.compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": [n for n, m in model.named_modules()
                                  if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)],
    }
    tmp = directory / "model.safetensors.tmp"
    save_file(to_bnb_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    model.config.save_pretrained(str(directory))
    del model.config.quantization_config
    return directory


def load_bnb_checkpoint(directory: str | os.PathLike, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers bitsandbytes 4-bit checkpoint (config.json + safetensors) as a model with lowbit layers."""
    import transformers
    from accelerate import init_empty_weights

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not (directory / "config.json").is_file() or not files:
        raise FileNotFoundError(f"{directory} needs config.json and *.safetensors of a bitsandbytes 4-bit model")
    try:  # config.json is untrusted input too: whatever transformers cannot build from it is one CheckpointError
        config = transformers.AutoConfig.from_pretrained(str(directory))
        qc = getattr(config, "quantization_config", None)
        qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
        if not qc.get("load_in_4bit"):
            raise CheckpointError(f"{directory} is not a bitsandbytes 4-bit checkpoint (no load_in_4bit in its config)")
        del config.quantization_config
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(config)
    except CheckpointError:
        raise
    except CONFIG_ERRORS as e:
        raise CheckpointError(f"{directory}/config.json does not describe a model transformers can build "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                state.update({k: st.get_tensor(k) for k in st.keys()})
        except SafetensorError as e:
            raise CheckpointError(f"{f} cannot be read ({e}): the file is damaged") from None
    return from_bnb_state_dict(model, state, compute_dtype)


def bnb_fused_cpu(model: nn.Module, enabled: bool) -> int:
    """Choose bitsandbytes' eval-mode CPU path for every bitsandbytes Linear4bit in ``model``; returns how many.

    Where the CPU has AVX512_BF16, bitsandbytes (0.50) repacks an eval-mode Linear4bit's weight on its first call
    and runs a fused kernel in bf16 (input, absmax and output rounded to bf16); elsewhere, and in training mode, it
    dequantizes and multiplies in the compute dtype, as lowbit's reference path does. ``enabled=False`` forces
    that second path on any CPU; ``enabled=True`` is refused where the CPU lacks the instructions.
    """
    quiet_kernel_notice()
    import bitsandbytes as bnb

    if enabled and not bnb.functional.has_avx512bf16():
        raise RuntimeError("bitsandbytes' fused 4-bit CPU kernel needs AVX512_BF16, which this CPU lacks")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = enabled
    return len(layers)

