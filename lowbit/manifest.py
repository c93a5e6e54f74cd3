"""The checkpoint manifest (lowbit.json) as untrusted input: every field checked before anything is read.

``validate(manifest, directory)`` raises ``CheckpointError`` naming the first field that is missing, of the wrong
type, out of range, or (for file names) pointing outside the checkpoint folder.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from lowbit.config import DTYPES
from lowbit.plan import quantization_from_dict


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read as asked: the message says why."""


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _config_errors() -> tuple[type[BaseException], ...]:
    # RuntimeError: torch, on negative sizes; AssertionError: torch's nn.Embedding on a padding_idx past the vocab
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, AttributeError, IndexError, OSError,
                                               RuntimeError, ArithmeticError, AssertionError)
    try:  # transformers' configs are strict dataclasses of huggingface_hub, which raise its own exception types
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:
        pass
    return errors


# What transformers may raise while building a model from a config it did not write: for an untrusted config
# (a checkpoint's), each means "this config describes no model", one CheckpointError.
CONFIG_ERRORS = _config_errors()


def _fail(field: str, why: str) -> CheckpointError:
    return CheckpointError(f"lowbit.json: {field} {why}: the checkpoint is damaged or was not written by lowbit")


def _get(d: dict, key: str, kind, field: str, optional: bool = False):
    if key not in d:
        if optional:
            return None
        raise _fail(f"{field}.{key}" if field else key, "is missing")
    v = d[key]
    if optional and v is None:
        return None
    if not _is(v, kind):
        raise _fail(f"{field}.{key}" if field else key, f"must be {_KIND_NAMES.get(kind, kind.__name__)}, got {type(v).__name__}")
    return v


def _is(v, kind) -> bool:
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, kind)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
               list: "a list"}


def safe_file(directory: Path, name, field: str) -> Path:
    """directory / name for a plain file name that stays inside ``directory`` (symlinks resolved), else an error."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise _fail(field, f"must be a plain file name inside the checkpoint folder, got {name!r}")
    path = directory / name
    root = directory.resolve()
    if path.is_symlink() or path.exists():
        real = path.resolve()
        if real.parent != root and root not in real.parents:
            raise CheckpointError(f"lowbit.json: {field} {name!r} points outside the checkpoint folder (to {real}): refused")
    return path


def check_layer_spec(name: str, spec, layer_types: dict) -> None:
    field = f"layers[{name!r}]"
    if not isinstance(spec, dict):
        raise _fail(field, f"must be an object, got {type(spec).__name__}")
    kind = _get(spec, "type", str, field)
    cls = layer_types.get(kind)
    if cls is None:
        raise _fail(f"{field}.type", f"is {kind!r}, not a lowbit layer ({', '.join(layer_types)})")
    params = {p: v for p, v in inspect.signature(cls.__init__).parameters.items() if p != "self"}
    unknown = sorted(set(spec) - set(params) - {"type"})
    if unknown:
        raise _fail(field, f"has unknown field(s) {unknown}")
    for p, param in params.items():
        if p == "compute_dtype":
            v = _get(spec, p, str, field)
            if v not in DTYPES:
                raise _fail(f"{field}.{p}", f"is {v!r}, not one of {', '.join(DTYPES)}")
            continue
        default = param.default
        if p not in spec and default is not inspect.Parameter.empty:
            continue  # an argument added later, with its default: checkpoints written before it still load
        kind = {bool: bool, int: int, float: float, str: str}.get(type(default), int)  # in/out features: int
        if default is None:  # an "X | None" argument the layer resolves: the saved value is X
            kind = next((k for k in (str, bool, float) if k.__name__ in str(param.annotation)), int)
        v = _get(spec, p, kind, field)
        if kind is int and v < (1 if p in ("in_features", "out_features") else 0):
            raise _fail(f"{field}.{p}", f"must be {'positive' if p.endswith('features') else 'non-negative'}, got {v}")


def validate(manifest, directory: Path, layer_types: dict) -> dict:
    """``manifest`` if it is a well-formed lowbit manifest for a checkpoint in ``directory``, else CheckpointError."""
    if not isinstance(manifest, dict):
        raise _fail("the manifest", f"must be a JSON object, got {type(manifest).__name__}")
    for key, kind in (("lowbit_version", str), ("architecture", str)):
        _get(manifest, key, kind, "", optional=True)
    quant = _get(manifest, "quantization", dict, "", optional=True)
    if quant is not None:
        try:
            quantization_from_dict(quant)
        except (ValueError, TypeError) as e:
            raise _fail("quantization", f"is not a valid config ({e})") from None
    cfg = _get(manifest, "model_config", dict, "", optional=True)
    if cfg is not None:
        _get(cfg, "model_type", str, "model_config")
    layers = _get(manifest, "layers", dict, "")
    for name, spec in layers.items():
        check_layer_spec(name, spec, layer_types)
    tied = _get(manifest, "tied", dict, "", optional=True) or {}
    for alias, target in tied.items():
        if not isinstance(target, str):
            raise _fail(f"tied[{alias!r}]", f"must name a tensor (a string), got {type(target).__name__}")
    for name, dtype in (_get(manifest, "buffer_dtypes", dict, "", optional=True) or {}).items():
        if dtype not in (*DTYPES, "float64"):
            raise _fail(f"buffer_dtypes[{name!r}]", f"is {dtype!r}, not a float dtype name")
    shards = _get(manifest, "shards", list, "")
    seen_files, seen_tensors = set(), set()
    for i, shard in enumerate(shards):
        field = f"shards[{i}]"
        if not isinstance(shard, dict):
            raise _fail(field, f"must be an object, got {type(shard).__name__}")
        file = _get(shard, "file", str, field)
        safe_file(directory, file, f"{field}.file")
        if file in seen_files:
            raise _fail(f"{field}.file", f"repeats {file!r}")
        seen_files.add(file)
        if not _SHA256.match(_get(shard, "sha256", str, field)):
            raise _fail(f"{field}.sha256", "must be 64 lowercase hex digits")
        if _get(shard, "bytes", int, field) < 8:
            raise _fail(f"{field}.bytes", "must be at least 8 (a safetensors header length)")
        names = _get(shard, "tensors", list, field)
        for t in names:
            if not isinstance(t, str):
                raise _fail(f"{field}.tensors", f"must list tensor names (strings), got {type(t).__name__}")
            if t in seen_tensors:
                raise _fail(f"{field}.tensors", f"repeats {t!r}")
            seen_tensors.add(t)
    tok = _get(manifest, "tokenizer", str, "", optional=True)
    if tok is not None:
        safe_file(directory, tok, "tokenizer")
    return manifest


_LAYER_COUNT = re.compile(r"^(num_hidden_layers|n_layers?|num_layers|(num_)?(en|de)coder_layers)$")
_NOT_A_SIZE = re.compile(r"theta|_id$|seed")  # large integers that size nothing


def check_config_scale(cfg: dict, n_tensors: int, file_bytes: int, where: str = "lowbit.json") -> None:
    """Refuse a model_config that would take longer to build, or more memory, than its files could justify.

    Parameters go to the meta device, but a config can still ask for 20,000 layers (minutes of module building,
    each layer needing tensors the manifest does not list) or a size that sets a buffer computed at build
    (rotary frequencies, masks) larger than the files."""
    for key, value in cfg.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if _LAYER_COUNT.match(key) and value > n_tensors:
            raise CheckpointError(f"{where}: model_config.{key} = {value} layers, but the checkpoint holds only "
                                  f"{n_tensors} tensors")
        if value > max(file_bytes, 1 << 20) and not _NOT_A_SIZE.search(key):
            raise CheckpointError(f"{where}: model_config.{key} = {value} is larger than the checkpoint's files "
                                  f"({file_bytes} bytes) could hold")
