"""A lowbit checkpoint as transformers reads it, with no transformers class: the config.json content (lowbit's
``quantization_config`` entry) a save writes beside the manifest, and the folders transformers' ``save_pretrained``
writes from a lowbit model, recognized by that entry and opened through ``from_pretrained``.

transformers reads the entry through lowbit's quantizer (``lowbit.interop.hf``, the adapter, which builds on this
package), registered by ``lowbit.interop.hf_hook`` the moment transformers' quantizer registry is imported, which
``from_pretrained`` does before it reads a folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.checkpoint.format import FORMAT_VERSION
from lowbit.checkpoint.layers import layer_specs, unsaved_buffer_dtypes
from lowbit.jsonfile import JSONFileError, read_json
from lowbit.manifest import CheckpointError

QUANT_METHOD = "lowbit"


def quantization_config_dict(config: dict | None, layers: dict | None, buffer_dtypes: dict | None = None,
                             format_version: int | None = None) -> dict:
    """config.json's ``quantization_config`` for a lowbit model: its lowbit config (a dict, or None), its quantized
    layers' specs (``layer_specs``), the dtypes of the float buffers a state dict leaves out, if any, and the format
    version (this lowbit's unless given)."""
    d = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION if format_version is None else format_version,
         "config": config, "layers": layers}
    if buffer_dtypes:
        d["buffer_dtypes"] = buffer_dtypes
    return d


def hf_config_json(model: nn.Module) -> dict | None:
    """config.json content for a lowbit checkpoint of a transformers model (with its quantization_config), or None
    for a model transformers did not build."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict") or not hasattr(model, "named_modules"):
        return None
    layers = layer_specs(model)
    qconfig = getattr(model, "lowbit_config", None)
    d = config.to_dict()
    d.pop("quantization_config", None)
    if layers or qconfig is not None:
        d["quantization_config"] = quantization_config_dict(qconfig.to_dict() if qconfig is not None else None,
                                                            layers, unsaved_buffer_dtypes(model))
    d["architectures"] = [type(model).__name__]
    return d


def is_hf_lowbit_folder(directory) -> bool:
    """Whether ``directory`` is a transformers folder whose config.json names lowbit (``save_pretrained`` output);
    CheckpointError (one line) for a config.json that is not JSON, or too large or deep to parse safely."""
    path = Path(directory) / "config.json"
    try:
        q = read_json(path).get("quantization_config") if path.is_file() else None
    except JSONFileError as e:  # said here: transformers would parse it next, and fail with a traceback
        raise CheckpointError(str(e)) from None
    except (OSError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def load_hf_folder(directory, dtype: torch.dtype | str = "auto") -> nn.Module:
    """A transformers folder written by ``save_pretrained`` from a lowbit model, through transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.from_pretrained(directory)  # a config transformers cannot read fails here, with its message
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
