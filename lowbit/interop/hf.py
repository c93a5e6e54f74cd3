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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.checkpoint import (FORMAT_VERSION, LAYER_TYPES, MANIFEST, QUANT_METHOD, check_complete, check_layers,
                               check_shard_headers, layer_layout, layer_specs, quantization_config_dict, read_manifest,
                               restore_buffer_dtypes, swap_layers, verify_shards)
from lowbit.config import BaseConfig
from lowbit.plan import quantization_from_dict
from lowbit.registry import is_calibrated
from lowbit.jsonfile import JSONFileError, read_json
from lowbit.manifest import CheckpointError, check_layer_spec, safe_file
from lowbit.nn.base import owner_of


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
        return quantization_config_dict(self.config, self.layers, self.buffer_dtypes, self.format_version)

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def lowbit_config(self) -> BaseConfig | None:
        return None if self.config is None else quantization_from_dict(self.config)

    def check(self) -> None:
        """Raise CheckpointError (one line) unless this entry can be read by this lowbit."""
        where = "config.json: quantization_config"
        v = self.format_version
        if v is None:
            raise CheckpointError(f"{where}.format_version is missing: not written by lowbit, or damaged")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(f"{where}.format_version must be a positive integer, got {v!r}")
        if v > FORMAT_VERSION:
            from lowbit.version import __version__

            raise CheckpointError(f"{where} is lowbit format {v}; lowbit {__version__} reads formats up to "
                                  f"{FORMAT_VERSION}: upgrade lowbit")
        if self.unknown:
            raise CheckpointError(f"{where} has unknown field(s) {sorted(self.unknown)}")
        if not isinstance(self.layers, dict):
            raise CheckpointError(f"{where}.layers must be an object naming each quantized layer, got "
                                  f"{type(self.layers).__name__}")
        try:
            for name, spec in self.layers.items():
                check_layer_spec(name, spec, LAYER_TYPES)
            if self.config is not None:
                quantization_from_dict(self.config)
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
    parent = owner_of(model, name)[0]
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
        if isinstance(quantization_config, BaseConfig):  # from_pretrained(..., quantization_config=lowbit.NF4Config())
            if is_calibrated(quantization_config):
                raise ValueError(f"{type(quantization_config).__name__} needs calibration data, which from_pretrained "
                                 "cannot pass: load the model, then lowbit.quantize(model, config, calibration=ids)")
            quantization_config = LowbitConfig(config=quantization_config.to_dict())
        super().__init__(quantization_config, **kwargs)
        self.lowbit_config = None
        self.targets: set[str] = set()
        self.listed: set[str] | None = None  # the shards lowbit.json names, once check_folder has read it

    def validate_environment(self, *args, **kwargs) -> None:
        if self.pre_quantized:
            self.quantization_config.check()
        self.lowbit_config = self.quantization_config.lowbit_config()
        if not self.pre_quantized and self.lowbit_config is None:
            raise ValueError("quantization_config names lowbit but no lowbit config (NF4Config(), Int8Config(), ...)")

    def update_attn_implementation(self, config):
        # The first call that sees the folder, before transformers reads any of its files.
        if self.pre_quantized and Path(config.name_or_path).is_dir():
            self.listed = check_folder(config.name_or_path, self.quantization_config.layers)
        # The model's config carries transformers' form of the quantization config from here on (saving it too).
        config.quantization_config = self.quantization_config
        return config

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        if self.pre_quantized:
            files = kwargs.get("checkpoint_files") or []
            check_files(model.config.name_or_path, files, self.listed)
            swap_layers(model, self.quantization_config.layers)
            self.layout = layer_layout(model)  # what the files must fill in: checked in their headers, then read
            self.read = check_shard_headers(files, model, self.layout)
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
        layers = layer_specs(model)
        left = [name for name in self.targets if name not in layers]
        if left:
            raise ValueError(f"transformers read no weight for {len(left)} layer(s) to quantize, e.g. {sorted(left)[:3]}")
        emb = _quantized_tied_embeddings(model)
        if emb is not None:  # the head read nothing (its tensors are the embeddings'): it is the rows layer
            model.set_output_embeddings(emb.rows)
            layers = layer_specs(model)
        if self.pre_quantized:  # once the head is the rows layer: its own buffers were never read
            check_complete(model, self.read)
            check_layers(model, self.layout)
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


def check_folder(folder, layers: dict) -> set[str] | None:
    """Raise CheckpointError unless the lowbit checkpoint in the local ``folder`` passes the checks ``lowbit.load``
    runs, before transformers reads a byte of it (its dtype guess reads the first shard's header): every shard a
    plain file inside the folder, readable as safetensors, and, for a ``lowbit.save`` checkpoint, matching its
    checksum in lowbit.json, whose layers config.json must describe. Returns the shard names lowbit.json lists (None
    for a ``save_pretrained`` folder, which has no lowbit.json)."""
    folder = Path(folder)
    listed = None
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)  # shard names: plain files inside the folder
        if layers != manifest["layers"]:
            raise CheckpointError(f"{folder}: config.json describes other layers than {MANIFEST}: the checkpoint "
                                  "is damaged")
        verify_shards(folder, manifest)
        names = listed = {s["file"] for s in manifest["shards"]}
    else:  # save_pretrained output: transformers' files alone, with no checksums to hold them to
        index = folder / "model.safetensors.index.json"
        try:
            weight_map = read_json(index).get("weight_map") if index.is_file() else {"": "model.safetensors"}
        except (JSONFileError, OSError, AttributeError) as e:
            raise CheckpointError(f"{index} cannot be read: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard files")
        names = sorted(set(weight_map.values()))
    for name in names:
        path = safe_file(folder, name, "a shard")
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"shard {name} cannot be read ({e}): the file is damaged") from None
    return listed


def check_files(folder, files: list[str], listed: set[str] | None) -> None:
    """Raise CheckpointError unless the shards transformers is about to read lie inside the checkpoint's folder (no
    link out of it) and, for a ``lowbit.save`` checkpoint, are the shards its lowbit.json names (``listed``, from
    ``check_folder``)."""
    folder = Path(folder) if Path(folder).is_dir() else Path(files[0]).parent if files else None
    if folder is None:
        return
    # A folder of the hub's cache (snapshots/<rev>/) links its files to blobs two levels up: inside the repo's cache.
    root = folder.resolve().parents[1] if folder.parent.name == "snapshots" else folder.resolve()
    for f in files:
        real = Path(f).resolve()
        if root not in real.parents:
            raise CheckpointError(f"{f} points outside the checkpoint folder (to {real}): refused")
    if listed is None and (folder / MANIFEST).is_file():  # a folder check_folder did not see (the hub's cache)
        listed = {s["file"] for s in read_manifest(folder)["shards"]}
    if listed is not None:
        if {Path(f).name for f in files} != listed or any(Path(f).resolve().parent != folder.resolve() for f in files):
            raise CheckpointError(f"{folder}: model.safetensors.index.json names other shards than {MANIFEST}: "
                                  "the checkpoint is damaged")


def register() -> None:
    """Register lowbit with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)


register()  # importing this module is what registers lowbit (hf_hook imports it when transformers' registry loads)
