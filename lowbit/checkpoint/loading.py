"""lowbit.load: rebuild a model from a checkpoint, checking every file against the manifest as it is read.

Loading builds the model with its parameters on the meta device and assigns each tensor as it is read, so the
full-precision weights never exist in memory. Memory: each tensor is read once, into the tensor the model keeps
(with ``mmap``, a view of a private memory map of its shard, read only when used).
A folder written by transformers' ``save_pretrained`` from a lowbit model is opened through transformers
(``lowbit.checkpoint.hf_format``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.checkpoint.format import FORMAT, FORMAT_VERSION, MANIFEST
from lowbit.checkpoint.hf_format import is_hf_lowbit_folder, load_hf_folder
from lowbit.checkpoint.layers import LAYER_TYPES, check_layers, layer_layout, restore_buffer_dtypes, swap_layers
from lowbit.config import COMPUTE_DTYPES
from lowbit.jsonfile import JSONFileError, read_json
from lowbit.plan import quantization_from_dict
from lowbit.manifest import CONFIG_ERRORS, CheckpointError, check_config_scale, safe_file, validate
from lowbit.nn import QuantLinear
from lowbit.nn.base import owner_of
from lowbit.shards import ShardError, map_tensors
from lowbit.version import __version__


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


def _manifest_stamp(directory: Path):
    try:
        st = (directory / MANIFEST).stat()
        return st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


def _load_once(directory: Path, model: nn.Module | None, verify: bool, mmap: bool = False) -> nn.Module:
    manifest = read_manifest(directory)
    files = _open_shards(directory, manifest["shards"])
    try:
        return _fill(directory, manifest, files, model, verify, mmap)
    finally:
        for f in files:
            f.close()


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


def _sha256_of(f) -> tuple[str, int]:
    """(hex SHA-256, bytes) of an open binary file, read from its start."""
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(1 << 24), b""):
        h.update(chunk)
    return h.hexdigest(), f.tell()


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
        module, attr = owner_of(model, alias)
        src, tgt_attr = owner_of(model, target)
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
        model.lowbit_config = quantization_from_dict(quant)
    return model.eval()


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer called ``name`` (a parameter stays one)."""
    module, attr = owner_of(model, name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = tensor


def _owner_is_quantized(model: nn.Module, name: str) -> bool:
    return isinstance(owner_of(model, name)[0], QuantLinear)


def _check_tensor(model: nn.Module, name: str, t: torch.Tensor, want: torch.Tensor) -> None:
    # A lowbit layer's buffers have the exact dtype its constructor gives them; other tensors (embeddings, norms,
    # unquantized layers) come back in the dtype they were saved in, one of those models compute in: a bf16 model
    # loads as bf16 (float64 would fail at the first product with a float32 input).
    same_kind = t.dtype in COMPUTE_DTYPES and want.dtype.is_floating_point and not _owner_is_quantized(model, name)
    if t.shape != want.shape or (t.dtype != want.dtype and not same_kind):
        raise CheckpointError(f"{name}: the checkpoint has {t.dtype} {tuple(t.shape)}, "
                              f"the model expects {want.dtype} {tuple(want.shape)}")


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
