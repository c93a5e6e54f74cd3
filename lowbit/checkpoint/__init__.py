"""lowbit.save / lowbit.load: quantized checkpoints as safetensors shards and one JSON manifest.

One module per job:

- ``format``: the format's name and version, and the manifest's file name;
- ``sizes``: shard sizes ("2GB") parsed and checked;
- ``layers``: lowbit layers as specs and back, and the checks of a model's tensors against them and the files;
- ``hf_format``: the config.json entry transformers reads, and ``save_pretrained`` folders of lowbit models;
- ``saving``: ``save``, the atomic save transaction (``Saving``) and its checks of the target folder;
- ``loading``: ``load``, reading and checking the manifest and the shards, and filling the model from them.

Every name the rest of lowbit uses is importable from here.
"""
from lowbit.checkpoint.format import FORMAT, FORMAT_VERSION, MANIFEST
from lowbit.checkpoint.hf_format import (QUANT_METHOD, hf_config_json, is_hf_lowbit_folder, load_hf_folder,
                                         quantization_config_dict)
from lowbit.checkpoint.layers import (LAYER_TYPES, check_complete, check_layers, check_shard_headers, layer_layout,
                                      layer_specs, restore_buffer_dtypes, swap_layers, unsaved_buffer_dtypes)
from lowbit.checkpoint.loading import assign, load, load_tokenizer, read_manifest, verify_shards
from lowbit.checkpoint.saving import Saving, blocking_ancestor, check_target, save
from lowbit.checkpoint.sizes import parse_size, shard_limit
from lowbit.manifest import CheckpointError

__all__ = ["CheckpointError", "save", "load", "load_tokenizer", "read_manifest", "check_target", "check_layers",
           "check_complete", "check_shard_headers", "layer_layout", "swap_layers", "verify_shards"]
