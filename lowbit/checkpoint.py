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
from torch import nn

from lowbit.config import DTYPES, COMPUTE_DTYPES, config_from_dict
from lowbit.folderlock import LOCK_NAME, FolderLock, busy_error, writer_pid
from lowbit.jsonfile import JSONFileError, read_json
from lowbit.manifest import CONFIG_ERRORS, CheckpointError, check_config_scale, safe_file, validate
from lowbit.nn import BitLinear, HalfLinear, Int8Linear, IntLinear, Linear4bit, QuantEmbedding, QuantLinear, SpQRLinear
from lowbit.nn.base import check_range, is_linear_like, linear_weight
from lowbit.shards import ShardError, ShardWriter, fsync, map_tensors
from lowbit.version import __version__

FORMAT, FORMAT_VERSION, MANIFEST = "lowbit", 1, "lowbit.json"
LAYER_TYPES = {cls.__name__: cls for cls in (Int8Linear, Linear4bit, BitLinear, IntLinear, SpQRLinear, HalfLinear,
                                              QuantEmbedding)}
# Files a save removes as leftovers of earlier ones. The write lock (LOCK_NAME) is not among them: the save holding
# it removes it as it unlocks, and the next save takes over one left by a killed process.
_OURS = ("model-*.safetensors", "model-*.tmp", "tokenizer-*", f"{MANIFEST}.*.tmp")
_FLOAT_DTYPES = {**DTYPES, "float64": torch.float64}
__all__ = ["CheckpointError", "save", "load", "load_tokenizer", "read_manifest", "check_target", "check_layers",
           "check_complete", "check_shard_headers", "layer_layout", "swap_layers", "verify_shards"]


def parse_size(size: int | str) -> int:
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
        if key in first and t.numel():  # empty tensors share no data, whatever their (null) pointer says
            tied[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, tied


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


def restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    """Cast the float buffers a state dict leaves out back to the dtypes they were saved in (``unsaved_buffer_dtypes``)."""
    buffers = dict(model.named_buffers())
    for name, dtype in dtypes.items():
        if name in buffers and buffers[name].is_floating_point() and dtype in _FLOAT_DTYPES:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[attr] = buffers[name].to(_FLOAT_DTYPES[dtype])


def unsaved_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """dtype names of the float buffers a state dict leaves out (rotary inv_freq, ...): ``model.to(bf16)`` casts
    them too, and a rebuilt model must compute with the same ones to give the same outputs."""
    saved = set(model.state_dict())
    return {name: str(b.dtype).removeprefix("torch.") for name, b in model.named_buffers()
            if name not in saved and b.is_floating_point()}


def _sha256_of(f) -> tuple[str, int]:
    """(hex SHA-256, bytes) of an open binary file, read from its start."""
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(1 << 24), b""):
        h.update(chunk)
    return h.hexdigest(), f.tell()


def check_target(directory: str | os.PathLike) -> Path:
    """Raise CheckpointError unless ``save`` could write to ``directory`` (run it before long work)."""
    if not os.fspath(directory).strip():  # Path("") is the current folder: an empty name must not mean "here"
        raise CheckpointError("the checkpoint folder name is empty: give a folder (\".\" for the current one)")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    pid = writer_pid(directory) if directory.is_dir() else None
    if pid is not None:
        raise busy_error(directory, pid)
    # The lock file of a save killed before it could remove it is no content: the next save takes it over.
    content = directory.is_dir() and any(p.name != LOCK_NAME for p in directory.iterdir())
    if content and not (directory / MANIFEST).is_file():
        raise CheckpointError(f"{directory} is not empty and holds no lowbit checkpoint; refusing to write into it")
    parent = blocking_ancestor(directory)
    if parent is not None:
        raise CheckpointError(f"cannot write to {directory}: {parent} is not a writable folder")
    return directory


def blocking_ancestor(path: Path) -> Path | None:
    """The nearest existing folder at or above ``path`` if it cannot take new files (where ``path`` would be
    created), else None."""
    parent = path
    while not parent.exists():
        parent = parent.parent
    return None if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK) else parent


def _previous_files(directory: Path) -> set[str]:
    """Files the committed manifest names: kept through the next save, for loads that read it before the commit."""
    try:
        old = read_json(directory / MANIFEST)
        return {sh["file"] for sh in old["shards"]} | {old.get("tokenizer")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def shard_limit(max_shard_size: int | str) -> int:
    """max_shard_size in bytes, or CheckpointError."""
    try:
        limit = parse_size(max_shard_size)
    except ValueError:
        raise CheckpointError(f"max_shard_size must be a size such as 2GB, 500MB or a byte count, got {max_shard_size!r}") from None
    if limit <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return limit


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None, max_shard_size: int | str = "2GB") -> Path:
    """Write ``model`` (quantized by lowbit or not) and optionally its tokenizer to ``directory``, atomically."""
    directory = check_target(directory)
    limit = shard_limit(max_shard_size)
    tensors, tied = _tensors(model)
    with Saving(directory, limit) as saving:
        for name, t in tensors.items():
            saving.add(name, t)
        saving.commit(model, tied, tokenizer)
    return directory


class Saving:
    """One save into ``directory``: tensors are added in state-dict order (streamed to shards as they come), then
    ``commit`` writes the tokenizer, transformers' files and the manifest, whose rename is the commit. Leaving the
    ``with`` block by an exception removes everything this save wrote and puts back the files it replaced."""

    def __init__(self, directory: Path, limit: int):
        self.directory, self.limit = directory, limit
        self.save_id = uuid.uuid4().hex[:12]
        self.created = not directory.exists()
        self.made: list[Path] = []
        self.replaced: list[tuple[Path, bytes | None]] = []  # files at fixed names (config.json, ...) and old bytes
        self.writer = None

    def __enter__(self) -> "Saving":
        self.lock = FolderLock(self.directory)
        try:
            for attempt in range(3):
                self.directory.mkdir(parents=True, exist_ok=True)
                try:
                    self.lock.acquire()  # CheckpointError, naming the other writer, while another save runs
                    break
                except FileNotFoundError:  # a failed save that had made the folder removed it just now
                    if attempt == 2:
                        raise
        except OSError as e:
            raise CheckpointError(f"cannot write the checkpoint to {self.directory}: {e}") from None
        self.previous = _previous_files(self.directory)
        self.writer = ShardWriter(self.directory, f"model-{self.save_id}", self.limit,
                                  {"format": "pt", "writer": f"lowbit {__version__}"})
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)

    def commit(self, model: nn.Module, tied: dict[str, str], tokenizer=None) -> dict:
        """Write the shards and everything beside them, then the manifest; the manifest written."""
        directory, save_id = self.directory, self.save_id
        shards = self.writer.finish(lambda i, n: f"model-{save_id}-{i + 1:05d}-of-{n:05d}.safetensors")
        tok_file = None
        if tokenizer is not None:  # at the top of the folder, where AutoTokenizer.from_pretrained(dir) looks
            tok_dir = directory / f"tokenizer-{save_id}"
            self.made.append(tok_dir)
            tok_file = _save_tokenizer(tokenizer, tok_dir, directory, self.replaced)
        _write_hf_files(model, shards, directory, self.made, self.replaced)
        qconfig = getattr(model, "lowbit_config", None)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
            "quantization": qconfig.to_dict() if qconfig is not None else None,
            "architecture": type(model).__name__,
            "model_config": _model_config(getattr(model, "config", None)),
            "layers": layer_specs(model), "tied": tied, "shards": shards,
            "buffer_dtypes": unsaved_buffer_dtypes(model), "tokenizer": tok_file,
        }
        tmp = directory / f"{MANIFEST}.{save_id}.tmp"
        self.made.append(tmp)
        tmp.write_text(json.dumps(manifest, indent=1))
        fsync(tmp)
        os.replace(tmp, directory / MANIFEST)  # the commit
        self.manifest = manifest
        return manifest

    def __exit__(self, kind, e, tb) -> None:
        directory = self.directory
        try:
            if e is None:
                fsync(directory)
                # Leftovers of earlier saves, finished or not, go; the previous checkpoint's files stay until the next
                # save, so that a load that read the previous manifest just before the commit still finds its shards.
                keep = {s["file"] for s in self.manifest["shards"]} | {self.manifest["tokenizer"]} | self.previous
                for p in directory.iterdir():
                    if p.name not in keep and any(fnmatch(p.name, pat) for pat in _OURS):
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                return
            if self.writer is not None:
                self.writer._close_part()
            for path, old in reversed(self.replaced):  # the previous checkpoint's config.json, index, tokenizer
                try:
                    path.unlink(missing_ok=True) if old is None else path.write_bytes(old)
                except OSError:
                    pass
            for p in self.made + (self.writer.made if self.writer is not None else []):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    p.unlink()
            self.lock.release()  # before the folder is found empty: the lock file is this save's too
            if self.created and directory.is_dir() and not any(directory.iterdir()):
                try:
                    directory.rmdir()  # nothing half written: not even an empty folder
                except OSError:
                    pass  # another save has just begun in it
            if isinstance(e, (OSError, SafetensorError)):  # read-only file system, disk full, ...
                raise CheckpointError(f"cannot write the checkpoint to {directory}: {e}") from None
        finally:
            self.lock.release()  # the lock file goes with the lock: no junk that check_target would refuse


def _model_config(config) -> dict | None:
    if not hasattr(config, "to_json_string"):
        return None
    d = json.loads(config.to_json_string())
    d.pop("quantization_config", None)  # a model loaded through transformers' lowbit quantizer: the layers say it
    return d


def _keep_old(path: Path, replaced: list) -> None:
    """Remember ``path``'s content before it is replaced, so that a failed save can put it back."""
    replaced.append((path, path.read_bytes() if path.is_file() else None))


def _replace_from_tmp(path: Path, text: str, made: list[Path], replaced: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    made.append(tmp)
    tmp.write_text(text)
    fsync(tmp)
    _keep_old(path, replaced)
    os.replace(tmp, path)


def _save_tokenizer(tokenizer, tmp_dir: Path, directory: Path, replaced: list) -> str:
    """Save the tokenizer into ``tmp_dir``, then move its files to the top of ``directory``; the name of its config."""
    tokenizer.save_pretrained(str(tmp_dir))
    names = sorted(p.name for p in tmp_dir.iterdir())
    for name in names:
        _keep_old(directory / name, replaced)
        os.replace(tmp_dir / name, directory / name)
    tmp_dir.rmdir()
    return "tokenizer_config.json" if "tokenizer_config.json" in names else names[0]


def _write_hf_files(model: nn.Module, shards: list[dict], directory: Path, made: list[Path], replaced: list) -> None:
    """config.json (with lowbit's quantization_config), the safetensors index and generation_config.json, so that
    transformers' from_pretrained(dir) opens the checkpoint too. Written before the manifest's commit: the index
    names this save's shards, which are complete by then."""
    from lowbit.interop.hf import hf_files

    config = hf_files(model)
    if config is None:
        return
    _replace_from_tmp(directory / "config.json", json.dumps(config, indent=1, sort_keys=True), made, replaced)
    index = {"metadata": {"total_size": sum(s["bytes"] for s in shards), "writer": f"lowbit {__version__}"},
             "weight_map": {t: s["file"] for s in shards for t in s["tensors"]}}
    _replace_from_tmp(directory / "model.safetensors.index.json", json.dumps(index, indent=1), made, replaced)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_string"):
        _replace_from_tmp(directory / "generation_config.json", gen.to_json_string(), made, replaced)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checkpoint's manifest, checked for format and version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no {MANIFEST}: not a lowbit checkpoint")
    try:
        manifest = read_json(path)
    except JSONFileError as e:
        raise CheckpointError(f"{e}: the checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lowbit manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} was written by lowbit {manifest.get('lowbit_version', '?')} in checkpoint format {version}; "
            f"lowbit {__version__} reads formats up to {FORMAT_VERSION}: upgrade lowbit")
    return validate(manifest, Path(directory), LAYER_TYPES)


def _skeleton(manifest: dict, file_bytes: int) -> nn.Module:
    """The base model built from its saved config with every parameter on the meta device."""
    if manifest.get("model_config") is None:
        raise CheckpointError("this checkpoint holds no transformers config: pass the model to fill, load(dir, model=...)")
    import transformers
    from accelerate import init_empty_weights

    cfg = dict(manifest["model_config"])
    check_config_scale(cfg, sum(len(s["tensors"]) for s in manifest["shards"]), file_bytes)
    cls = getattr(transformers, manifest.get("architecture") or "", None)
    try:
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with init_empty_weights():
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                return cls._from_config(config)
            return transformers.AutoModelForCausalLM.from_config(config)
    except CONFIG_ERRORS as e:  # a config transformers cannot build
        raise CheckpointError(f"lowbit.json: model_config does not describe a model transformers can build "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def swap_layers(model: nn.Module, layers: dict) -> None:
    """Put an empty lowbit layer (on the meta device) in place of each module ``layers`` names, as its spec says."""
    for name, spec in layers.items():
        spec = dict(spec)
        cls = LAYER_TYPES.get(spec.pop("type", None))
        if cls is None:
            raise CheckpointError(f"layer {name}: unknown lowbit layer type; known: {', '.join(LAYER_TYPES)}")
        if cls is Int8Linear:  # written before zero-point activations existed (and became the default): absmax
            spec.setdefault("activations", "absmax")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint quantized a layer {name} that this model does not have") from None
        if cls is QuantEmbedding:
            _check_embedding(name, old, spec)
        elif isinstance(old, QuantLinear):
            if type(old) is not cls or old.init_kwargs() != {k: spec[k] for k in old.init_kwargs()}:
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
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


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


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer called ``name`` (a parameter stays one)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = tensor


def _open_shards(directory: Path, shards: list[dict]) -> list:
    """An open file per shard, taken right after the manifest is read: the files stay readable even if a save
    into the folder deletes them later (POSIX), so a load never mixes two checkpoints or loses a shard."""
    files = []
    try:
        for i, s in enumerate(shards):
            path = safe_file(directory, s["file"], f"shards[{i}].file")
            if not path.is_file():
                raise CheckpointError(f"shard {s['file']} is missing from {directory}")
            files.append(open(path, "rb"))
    except BaseException:
        for f in files:
            f.close()
        raise
    return files


def _fd_path(f, path: Path) -> str:
    """A path that opens this very file (not whatever now has its name), where the OS offers one."""
    for proc in (f"/proc/self/fd/{f.fileno()}", f"/dev/fd/{f.fileno()}"):
        if os.path.exists(proc):
            return proc
    return str(path)


def _verify(files: list, shards: list[dict]) -> None:
    for f, s in zip(files, shards):
        if _sha256_of(f) != (s["sha256"], s["bytes"]):
            raise CheckpointError(f"shard {s['file']} does not match its checksum: it was truncated or modified after saving")


def verify_shards(directory: str | os.PathLike, manifest: dict) -> None:
    """Raise CheckpointError unless every shard ``manifest`` names is a file inside ``directory`` that matches its
    checksum (for readers that open the shards themselves: transformers' from_pretrained)."""
    directory = Path(directory)
    files = _open_shards(directory, manifest["shards"])
    try:
        _verify(files, manifest["shards"])
    finally:
        for f in files:
            f.close()


def _owner_is_quantized(model: nn.Module, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    return isinstance(model.get_submodule(module_name) if module_name else model, QuantLinear)


def _check_tensor(model: nn.Module, name: str, t: torch.Tensor, want: torch.Tensor) -> None:
    # A lowbit layer's buffers have the exact dtype its constructor gives them; other tensors (embeddings, norms,
    # unquantized layers) come back in the dtype they were saved in, one of those models compute in: a bf16 model
    # loads as bf16 (float64 would fail at the first product with a float32 input).
    same_kind = t.dtype in COMPUTE_DTYPES and want.dtype.is_floating_point and not _owner_is_quantized(model, name)
    if t.shape != want.shape or (t.dtype != want.dtype and not same_kind):
        raise CheckpointError(f"{name}: the checkpoint has {t.dtype} {tuple(t.shape)}, "
                              f"the model expects {want.dtype} {tuple(want.shape)}")


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


def _check_one_float_dtype(model: nn.Module) -> None:
    """CheckpointError unless the float parameters outside lowbit layers share one dtype (those the model keeps in
    float32 aside): a norm saved in bfloat16 among float32 layers would fail at the first product."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    dtypes: dict[torch.dtype, str] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and not _owner_is_quantized(model, name) and \
                not (p.dtype == torch.float32 and any(k in name.split(".") for k in keep)):
            dtypes.setdefault(p.dtype, name)
    if len(dtypes) > 1:
        listed = ", ".join(f"{n} {str(d).removeprefix('torch.')}" for d, n in dtypes.items())
        raise CheckpointError(f"the checkpoint mixes float dtypes outside its lowbit layers ({listed}): the checkpoint "
                              "is damaged")


def _manifest_stamp(directory: Path):
    try:
        st = (directory / MANIFEST).stat()
        return st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


def load(directory: str | os.PathLike, model: nn.Module | None = None, verify: bool = True,
         mmap: bool = False) -> nn.Module:
    """Rebuild a saved model without materializing full-precision weights; ``model`` for non-transformers ones.

    With ``mmap`` the tensors are views of private (copy-on-write) memory maps of the shards: nothing is read until
    used, and the pages can be dropped and read again under memory pressure, so a model larger than the memory
    left runs (slower when it has to re-read).

    ``directory`` is a ``lowbit.save`` checkpoint or a transformers folder saved from a lowbit model
    (``save_pretrained``), which transformers' lowbit quantizer opens.

    A save into the same folder at the same time is safe: if its commit lands while this load reads, the load
    starts again on the new checkpoint (it never mixes the two)."""
    directory = Path(directory)
    if model is None and not (directory / MANIFEST).exists():
        from lowbit.interop.hf import is_hf_lowbit_folder, load_hf_folder

        if is_hf_lowbit_folder(directory):  # save_pretrained output of a lowbit model: transformers reads it
            return load_hf_folder(directory)
    for attempt in range(5):
        stamp = _manifest_stamp(directory)
        try:
            return _load_once(directory, model, verify, mmap)
        except (CheckpointError, OSError) as e:
            if attempt == 4 or _manifest_stamp(directory) == stamp:  # not a race with a save: a real error
                if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
                    raise CheckpointError(f"cannot read {directory}: {e}") from None
                raise
    raise AssertionError("unreachable")


def _load_once(directory: Path, model: nn.Module | None, verify: bool, mmap: bool = False) -> nn.Module:
    manifest = read_manifest(directory)
    files = _open_shards(directory, manifest["shards"])
    try:
        return _fill(directory, manifest, files, model, verify, mmap)
    finally:
        for f in files:
            f.close()


class _Mapped:
    """A shard's tensors as views of one private memory map of the file (safe_open's interface, for ``_fill``)."""

    def __init__(self, path: str, size: int):
        self.header, self.tensors = map_tensors(path, size)

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tensors = None


def _shard_reader(path: str, size: int, mmap: bool):
    return _Mapped(path, size) if mmap else safe_open(path, framework="pt")


def _fill(directory: Path, manifest: dict, files: list, model: nn.Module | None, verify: bool,
          mmap: bool = False) -> nn.Module:
    if verify:
        _verify(files, manifest["shards"])
    model = _skeleton(manifest, sum(os.fstat(f.fileno()).st_size for f in files)) if model is None else model
    swap_layers(model, manifest["layers"])
    layout = layer_layout(model)
    expected = model.state_dict(keep_vars=True)
    tied = manifest.get("tied") or {}
    seen = set()
    for shard, file in zip(manifest["shards"], files):
        try:
            with _shard_reader(_fd_path(file, directory / shard["file"]), os.fstat(file.fileno()).st_size, mmap) as f:
                names = list(f.keys())
                if sorted(names) != sorted(shard["tensors"]):
                    raise CheckpointError(f"shard {shard['file']} holds other tensors than lowbit.json lists")
                for name in names:
                    if name not in expected:
                        raise CheckpointError(f"the checkpoint has a tensor {name} that this model does not have")
                    t = f.get_tensor(name)
                    _check_tensor(model, name, t, expected[name])
                    assign(model, name, t)
                    seen.add(name)
        except (SafetensorError, ShardError) as e:
            raise CheckpointError(f"shard {shard['file']} cannot be read ({e}): the file is damaged") from None
    for alias, target in tied.items():
        if alias not in expected or target not in seen or alias in seen:
            raise CheckpointError(f"tied tensor {alias} -> {target} does not fit this model")
        module_name, _, attr = alias.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        tgt_module, _, tgt_attr = target.rpartition(".")
        src = model.get_submodule(tgt_module) if tgt_module else model
        holder = src._parameters if tgt_attr in src._parameters else src._buffers
        _check_tensor(model, alias, holder[tgt_attr], expected[alias])
        (module._parameters if attr in module._parameters else module._buffers)[attr] = holder[tgt_attr]
        seen.add(alias)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    check_layers(model, layout)
    _check_one_float_dtype(model)
    restore_buffer_dtypes(model, manifest.get("buffer_dtypes") or {})
    if manifest.get("quantization"):
        quant = dict(manifest["quantization"])
        if quant.get("method") == "int8" and "weight_only" in quant:  # a saved config, older than "activations"
            quant.setdefault("activations", "absmax")
        model.lowbit_config = config_from_dict(quant)
    return model.eval()


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved beside the model, or None."""
    manifest = read_manifest(directory)
    if not manifest.get("tokenizer"):
        return None
    from transformers import AutoTokenizer

    path = safe_file(Path(directory), manifest["tokenizer"], "tokenizer")
    # Checkpoints before 2026-12-02 kept the tokenizer in a folder of its own; now its files sit at the top.
    try:
        return AutoTokenizer.from_pretrained(str(path if path.is_dir() else Path(directory)))
    except CONFIG_ERRORS as e:  # it reads config.json too, an untrusted file
        raise CheckpointError(f"{directory}: the tokenizer cannot be loaded ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
