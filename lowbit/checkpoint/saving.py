"""lowbit.save: write a model as a checkpoint of safetensors shards and one JSON manifest, atomically.

A save writes new shards under names unique to it, then replaces ``lowbit.json`` in one rename: that
rename is the commit. Until it happens the previous manifest still names the previous shards, so an
interrupted save leaves the previous checkpoint whole; files of old or unfinished saves are removed
by the next successful save. Beside the manifest it writes the files transformers reads (config.json with lowbit's
quantization_config, the safetensors index, generation_config.json) and the tokenizer.

Memory: tensors are streamed to the shards one at a time (``lowbit.shards.ShardWriter``); ``save`` holds a CPU copy
of each tensor that is not a contiguous CPU tensor already (of all of them for a model on the GPU).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from lowbit.checkpoint.format import FORMAT, FORMAT_VERSION, MANIFEST
from lowbit.checkpoint.hf_format import hf_config_json
from lowbit.checkpoint.layers import layer_specs, unsaved_buffer_dtypes
from lowbit.checkpoint.sizes import shard_limit
from lowbit.folderlock import LOCK_NAME, FolderLock, busy_error, writer_pid
from lowbit.jsonfile import read_json
from lowbit.manifest import CheckpointError
from lowbit.shards import ShardWriter, fsync
from lowbit.version import __version__

# Files a save removes as leftovers of earlier ones. The write lock (LOCK_NAME) is not among them: the save holding
# it removes it as it unlocks, and the next save takes over one left by a killed process.
_OURS = ("model-*.safetensors", "model-*.tmp", "tokenizer-*", f"{MANIFEST}.*.tmp")


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
    config = hf_config_json(model)
    if config is None:
        return
    _replace_from_tmp(directory / "config.json", json.dumps(config, indent=1, sort_keys=True), made, replaced)
    index = {"metadata": {"total_size": sum(s["bytes"] for s in shards), "writer": f"lowbit {__version__}"},
             "weight_map": {t: s["file"] for s in shards for t in s["tensors"]}}
    _replace_from_tmp(directory / "model.safetensors.index.json", json.dumps(index, indent=1), made, replaced)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_string"):
        _replace_from_tmp(directory / "generation_config.json", gen.to_json_string(), made, replaced)
