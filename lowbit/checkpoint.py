"""lowbit.save / lowbit.load: quantized checkpoints as safetensors shards and one JSON manifest.

A save writes new shards under names unique to it, then replaces ``lowbit.json`` in one rename: that
rename is the commit. Until it happens the previous manifest still names the previous shards, so an
interrupted save leaves the previous checkpoint whole; files of old or unfinished saves are removed
by the next successful save. Loading builds the model with its parameters on the meta device and
assigns each tensor as it is read, so the full-precision weights never exist in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.config import _DTYPES, config_from_dict
from lowbit.nn import BitLinear, Int8Linear, IntLinear, Linear4bit, QuantLinear, SpQRLinear
from lowbit.nn.base import is_linear_like, linear_weight

FORMAT, FORMAT_VERSION, MANIFEST = "lowbit", 1, "lowbit.json"
LAYER_TYPES = {cls.__name__: cls for cls in (Int8Linear, Linear4bit, BitLinear, IntLinear, SpQRLinear)}
_OURS = ("model-*.safetensors", "model-*.safetensors.tmp", "tokenizer-*", f"{MANIFEST}.*.tmp")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read as asked: the message says why."""


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every persistent tensor by state-dict name, each storage once; ``tied`` maps repeats to the first name."""
    tensors, tied, first = {}, {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        if t.is_meta:
            raise CheckpointError(f"{name} is on the meta device: this model has no data to save")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in first:
            tied[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, tied


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt", "writer": f"lowbit {lowbit.__version__}"})


def _plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None, max_shard_size: int | str = "2GB") -> Path:
    """Write ``model`` (quantized by lowbit or not) and optionally its tokenizer to ``directory``, atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise CheckpointError(f"{directory} is not empty and holds no lowbit checkpoint; refusing to write into it")
    limit = _parse_size(max_shard_size)
    if limit <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size!r}")
    tensors, tied = _tensors(model)
    layers = {name: {"type": type(m).__name__, **m.init_kwargs()}
              for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    config = getattr(model, "config", None)
    qconfig = getattr(model, "lowbit_config", None)
    save_id = uuid.uuid4().hex[:12]
    plan = _plan_shards(tensors, limit)
    directory.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    try:
        shards = []
        for i, names in enumerate(plan):
            final = directory / f"model-{save_id}-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            tmp = final.with_name(final.name + ".tmp")
            made += [tmp, final]
            _write_shard({n: tensors[n] for n in names}, tmp)
            _fsync(tmp)
            os.replace(tmp, final)
            shards.append({"file": final.name, "sha256": _sha256(final), "bytes": final.stat().st_size, "tensors": names})
        tok_dir = None
        if tokenizer is not None:
            tok_dir = directory / f"tokenizer-{save_id}"
            made.append(tok_dir)
            tokenizer.save_pretrained(str(tok_dir))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": lowbit.__version__,
            "quantization": qconfig.to_dict() if qconfig is not None else None,
            "architecture": type(model).__name__,
            "model_config": json.loads(config.to_json_string()) if hasattr(config, "to_json_string") else None,
            "layers": layers, "tied": tied, "shards": shards,
            "tokenizer": tok_dir.name if tok_dir else None,
        }
        tmp = directory / f"{MANIFEST}.{save_id}.tmp"
        made.append(tmp)
        tmp.write_text(json.dumps(manifest, indent=1))
        _fsync(tmp)
        os.replace(tmp, directory / MANIFEST)  # the commit
    except BaseException:
        for p in made:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        raise
    _fsync(directory)
    keep = {s["file"] for s in shards} | {manifest["tokenizer"]}
    for p in directory.iterdir():  # leftovers of earlier saves, finished or not
        if p.name not in keep and any(fnmatch(p.name, pat) for pat in _OURS):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checkpoint's manifest, checked for format and version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no {MANIFEST}: not a lowbit checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lowbit manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} was written by lowbit {manifest.get('lowbit_version', '?')} in checkpoint format {version}; "
            f"lowbit {lowbit.__version__} reads formats up to {FORMAT_VERSION}: upgrade lowbit")
    if not isinstance(manifest.get("shards"), list) or not isinstance(manifest.get("layers"), dict):
        raise CheckpointError(f"{path} lacks its shard list or layer table: the checkpoint is damaged")
    return manifest


def _skeleton(manifest: dict) -> nn.Module:
    """The base model built from its saved config with every parameter on the meta device."""
    if manifest.get("model_config") is None:
        raise CheckpointError("this checkpoint holds no transformers config: pass the model to fill, load(dir, model=...)")
    import transformers
    from accelerate import init_empty_weights

    cfg = dict(manifest["model_config"])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    cls = getattr(transformers, manifest.get("architecture") or "", None)
    with init_empty_weights():
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def _swap_layers(model: nn.Module, layers: dict) -> None:
    for name, spec in layers.items():
        spec = dict(spec)
        cls = LAYER_TYPES.get(spec.pop("type", None))
        if cls is None:
            raise CheckpointError(f"layer {name}: unknown lowbit layer type; known: {', '.join(LAYER_TYPES)}")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint quantized a layer {name} that this model does not have") from None
        if isinstance(old, QuantLinear):
            if type(old) is not cls or old.init_kwargs() != {k: spec[k] for k in old.init_kwargs()}:
                raise CheckpointError(f"layer {name} is already a different lowbit layer")
        elif is_linear_like(old):
            out_f, in_f = linear_weight(old).shape
            if (in_f, out_f) != (spec["in_features"], spec["out_features"]):
                raise CheckpointError(f"shape mismatch at {name}: the checkpoint has {spec['in_features']} -> "
                                      f"{spec['out_features']} features, the model {in_f} -> {out_f}")
        else:
            raise CheckpointError(f"layer {name} is a {type(old).__name__} in this model, not a linear layer")
        spec["compute_dtype"] = _DTYPES[spec["compute_dtype"]]
        with torch.device("meta"):
            new = cls(**spec)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = tensor


def _verify(directory: Path, shards: list[dict]) -> None:
    for s in shards:
        path = directory / s["file"]
        if not path.is_file():
            raise CheckpointError(f"shard {s['file']} is missing from {directory}")
        if path.stat().st_size != s["bytes"] or _sha256(path) != s["sha256"]:
            raise CheckpointError(f"shard {s['file']} does not match its checksum: it was truncated or modified after saving")


def load(directory: str | os.PathLike, model: nn.Module | None = None, verify: bool = True) -> nn.Module:
    """Rebuild a saved model without materializing full-precision weights; ``model`` for non-transformers ones."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        _verify(directory, manifest["shards"])
    model = _skeleton(manifest) if model is None else model
    _swap_layers(model, manifest["layers"])
    expected = model.state_dict(keep_vars=True)
    tied = manifest.get("tied", {})
    seen = set()
    for shard in manifest["shards"]:
        try:
            with safe_open(str(directory / shard["file"]), framework="pt") as f:
                for name in f.keys():
                    if name not in expected:
                        raise CheckpointError(f"the checkpoint has a tensor {name} that this model does not have")
                    t = f.get_tensor(name)
                    want = expected[name]
                    if t.shape != want.shape or t.dtype != want.dtype:
                        raise CheckpointError(f"{name}: the checkpoint has {t.dtype} {tuple(t.shape)}, "
                                              f"the model expects {want.dtype} {tuple(want.shape)}")
                    _assign(model, name, t)
                    seen.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"shard {shard['file']} cannot be read ({e}): the file is damaged") from None
    for alias, target in tied.items():
        if alias not in expected or target not in seen:
            raise CheckpointError(f"tied tensor {alias} -> {target} does not fit this model")
        module_name, _, attr = alias.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        tgt_module, _, tgt_attr = target.rpartition(".")
        src = model.get_submodule(tgt_module) if tgt_module else model
        holder = src._parameters if tgt_attr in src._parameters else src._buffers
        (module._parameters if attr in module._parameters else module._buffers)[attr] = holder[tgt_attr]
        seen.add(alias)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    if manifest.get("quantization"):
        model.lowbit_config = config_from_dict(manifest["quantization"])
    return model.eval()


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved beside the model, or None."""
    manifest = read_manifest(directory)
    if not manifest.get("tokenizer"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(directory) / manifest["tokenizer"]))
