"""lowbit as a transformers quantization method ("quant_method": "lowbit"), registered when lowbit is imported.

- ``AutoModelForCausalLM.from_pretrained(path, quantization_config=lowbit.NF4Config())`` quantizes each linear layer
  as its weight is read (the full-precision model is never built);
- ``from_pretrained(dir)`` opens a lowbit checkpoint (``lowbit.save`` writes the config.json and the safetensors
  index transformers reads beside lowbit.json) or a folder written by ``save_pretrained``.

The config.json entry holds the lowbit config and every quantized layer's type and constructor arguments, so
that the layers can be built on the meta device before transformers fills them from the shards.
"""
from __future__ import annotations

import copy

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.config import CALIBRATED, _Config, config_from_dict
from lowbit.manifest import CheckpointError

QUANT_METHOD = "lowbit"


class LowbitConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a lowbit model in transformers' config.json."""

    def __init__(self, config: dict | None = None, layers: dict | None = None, format_version: int | None = None,
                 buffer_dtypes: dict | None = None, quant_method: str = QUANT_METHOD, **unknown) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version  # None: made here, not read (to_dict writes this lowbit's)
        self.config, self.layers, self.buffer_dtypes = config, layers, buffer_dtypes or {}
        self.unknown = unknown

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        from lowbit.checkpoint import FORMAT_VERSION

        version = FORMAT_VERSION if self.format_version is None else self.format_version
        d = {"quant_method": QUANT_METHOD, "format_version": version, "config": self.config,
             "layers": self.layers}
        if self.buffer_dtypes:
            d["buffer_dtypes"] = self.buffer_dtypes
        return d

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def lowbit_config(self) -> _Config | None:
        return None if self.config is None else config_from_dict(self.config)

    def check(self) -> None:
        """Raise CheckpointError (one line) unless this entry can be read by this lowbit."""
        from lowbit.checkpoint import FORMAT_VERSION, LAYER_TYPES
        from lowbit.manifest import _layer_spec

        where = "config.json: quantization_config"
        v = self.format_version
        if v is None:
            raise CheckpointError(f"{where}.format_version is missing: not written by lowbit, or damaged")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(f"{where}.format_version must be a positive integer, got {v!r}")
        if v > FORMAT_VERSION:
            import lowbit

            raise CheckpointError(f"{where} is lowbit format {v}; lowbit {lowbit.__version__} reads formats up to "
                                  f"{FORMAT_VERSION}: upgrade lowbit")
        if self.unknown:
            raise CheckpointError(f"{where} has unknown field(s) {sorted(self.unknown)}")
        if not isinstance(self.layers, dict):
            raise CheckpointError(f"{where}.layers must be an object naming each quantized layer, got "
                                  f"{type(self.layers).__name__}")
        try:
            for name, spec in self.layers.items():
                _layer_spec(name, spec, LAYER_TYPES)
            if self.config is not None:
                config_from_dict(self.config)
        except (CheckpointError, ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: {str(e).removeprefix('lowbit.json: ')}") from None


def _quantized_tied_embeddings(model):
    """The QuantEmbedding whose rows a tied head should be, or None: such a checkpoint holds the table once, under
    the embeddings' name, so transformers reads no tensor for the head and has no float weight to tie by name."""
    from lowbit.embeddings import embedding_pair
    from lowbit.nn import QuantEmbedding

    emb, head, _ = embedding_pair(model)
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if isinstance(emb, QuantEmbedding) and tie and type(head) is type(emb.rows) \
            and head.init_kwargs() == emb.rows.init_kwargs():
        return emb
    return None


def _mark_initialized(model, name: str) -> None:
    """Keep transformers' weight initialization off a lowbit layer (it has no float ``weight`` to initialize).

    Some models' ``_init_weights`` reach a child's weight from the parent (GPT-2: ``module.c_proj.weight`` of each
    attention and MLP block), so the parent is marked too, where it holds no tensors of its own that could need it."""
    model.get_submodule(name)._is_hf_initialized = True
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if parent is not model and not any(True for _ in parent.parameters(recurse=False)) \
            and not any(True for _ in parent.buffers(recurse=False)):
        parent._is_hf_initialized = True


class LowbitQuantize(ConversionOps):
    """Quantize one linear layer's weight as transformers reads it, and put the lowbit layer in its place."""

    def __init__(self, hf_quantizer: "LowbitHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model=None, full_layer_name: str | None = None, missing_keys=None,
                **kwargs) -> dict:
        from lowbit.nn.base import replace_module
        from lowbit.quantize import build_layer

        weight = next(iter(input_dict.values()))
        weight = weight[0] if isinstance(weight, list) else weight
        name = full_layer_name.rpartition(".")[0]
        module = model.get_submodule(name)
        bias = module._parameters.get("bias")
        # A copy of the layer that holds the read weight; a bias not read yet (still on meta) is loaded into the
        # lowbit layer when its turn comes.
        stand_in = copy.copy(module)
        stand_in._parameters = {**module._parameters, "weight": torch.nn.Parameter(weight, requires_grad=False),
                                "bias": None if bias is None or bias.is_meta else bias}
        try:
            with torch.no_grad():
                layer = build_layer(stand_in, self.hf_quantizer.lowbit_config)
        except (ValueError, TypeError, RuntimeError) as e:
            raise type(e)(f"layer {name}: {e}") from e
        if bias is not None and bias.is_meta:
            layer.bias = torch.empty(bias.shape, dtype=torch.float32, device="meta")
        replace_module(model, name, layer)
        _mark_initialized(model, name)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class LowbitHfQuantizer(HfQuantizer):
    """transformers' side of lowbit: which weights to quantize while loading, and the layers of saved ones."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs) -> None:
        if isinstance(quantization_config, _Config):  # from_pretrained(..., quantization_config=lowbit.NF4Config())
            if isinstance(quantization_config, CALIBRATED):
                raise ValueError(f"{type(quantization_config).__name__} needs calibration data, which from_pretrained "
                                 "cannot pass: load the model, then lowbit.quantize(model, config, calibration=ids)")
            quantization_config = LowbitConfig(config=quantization_config.to_dict())
        super().__init__(quantization_config, **kwargs)
        self.lowbit_config = None
        self.targets: set[str] = set()

    def validate_environment(self, *args, **kwargs) -> None:
        if self.pre_quantized:
            self.quantization_config.check()
        self.lowbit_config = self.quantization_config.lowbit_config()
        if not self.pre_quantized and self.lowbit_config is None:
            raise ValueError("quantization_config names lowbit but no lowbit config (NF4Config(), Int8Config(), ...)")

    def update_attn_implementation(self, config):
        # The model's config carries transformers' form of the quantization config from here on (saving it too).
        config.quantization_config = self.quantization_config
        return config

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        if self.pre_quantized:
            from lowbit.checkpoint import _swap_layers

            _swap_layers(model, self.quantization_config.layers)
            for name in self.quantization_config.layers:
                _mark_initialized(model, name)
            if _quantized_tied_embeddings(model) is not None:
                model.all_tied_weights_keys = {}  # tied below, once loaded: the head becomes the rows layer
            return
        from lowbit.quantize import eligible_layers

        self.targets = {name for name, _ in eligible_layers(model, self.lowbit_config)}
        if not self.targets:
            raise ValueError("no nn.Linear or Conv1D layer to quantize (check the config's skip / modules patterns)")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, _, attr = param_name.rpartition(".")
        return not self.pre_quantized and attr == "weight" and module in self.targets

    def get_quantize_ops(self) -> LowbitQuantize:
        return LowbitQuantize(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from lowbit.checkpoint import layer_specs, restore_buffer_dtypes

        layers = layer_specs(model)
        left = [name for name in self.targets if name not in layers]
        if left:
            raise ValueError(f"transformers read no weight for {len(left)} layer(s) to quantize, e.g. {sorted(left)[:3]}")
        emb = _quantized_tied_embeddings(model)
        if emb is not None:  # the head read nothing (its tensors are the embeddings'): it is the rows layer
            model.set_output_embeddings(emb.rows)
            layers = layer_specs(model)
        self.quantization_config.layers = layers
        restore_buffer_dtypes(model, self.quantization_config.buffer_dtypes)
        model.config.quantization_config = self.quantization_config
        model.lowbit_config = self.quantization_config.lowbit_config()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:  # LoRA on the frozen lowbit layers (docs/finetune.md)
        return True


def register() -> None:
    """Register lowbit with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)


def hf_files(model) -> dict | None:
    """config.json content for a lowbit checkpoint of a transformers model (with its quantization_config), or None
    for a model transformers did not build."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict") or not hasattr(model, "named_modules"):
        return None
    from lowbit.checkpoint import _unsaved_buffer_dtypes, layer_specs

    layers = layer_specs(model)
    qconfig = getattr(model, "lowbit_config", None)
    d = config.to_dict()
    d.pop("quantization_config", None)
    if layers or qconfig is not None:
        d["quantization_config"] = LowbitConfig(config=qconfig.to_dict() if qconfig is not None else None,
                                                layers=layers, buffer_dtypes=_unsaved_buffer_dtypes(model)).to_dict()
    d["architectures"] = [type(model).__name__]
    return d


def is_hf_lowbit_folder(directory) -> bool:
    """Whether ``directory`` is a transformers folder whose config.json names lowbit (``save_pretrained`` output)."""
    import json
    from pathlib import Path

    path = Path(directory) / "config.json"
    try:
        q = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def load_hf_folder(directory, dtype: torch.dtype | str = "auto"):
    """A transformers folder written by ``save_pretrained`` from a lowbit model, through transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.from_pretrained(directory)  # a config transformers cannot read fails here, with its message
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


register()  # importing this module is what registers lowbit (hf_hook imports it when transformers' registry loads)
