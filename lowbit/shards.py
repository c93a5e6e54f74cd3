"""safetensors files one tensor at a time: a reader of checkpoint folders and a writer of shards as tensors come.

Neither holds more than one tensor in memory. The reader uses plain positioned reads, not a map of the whole file:
an address-space limit (``ulimit -v``) counts a map in full, and a mapped file's touched pages count as the
process's resident memory until it is closed. The writer puts tensors in the order safetensors' own writer does
(wider element types first), so every tensor of a shard is aligned for its dtype and can be memory-mapped in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from lowbit.jsonfile import JSONFileError, loads_bounded, read_json

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own bound on the JSON header


class ShardError(ValueError):
    """A safetensors file or folder that cannot be read as one: the message names the file and the fault."""


def read_header(f, path: Path | str) -> tuple[dict, int]:
    """(the header's tensor entries by name, byte offset of the data) of an open safetensors file; checked."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise ShardError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        raise ShardError(f"{path} is not a safetensors file (header length {n})")
    try:
        header = loads_bounded(f.read(n), f"{path}'s safetensors header")
    except JSONFileError as e:
        raise ShardError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    size, start = os.fstat(f.fileno()).st_size, 8 + n
    for name, e in header.items():
        ok = isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list) \
            and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
        if ok:
            a, b = e["data_offsets"]
            numel = 1
            for d in e["shape"]:
                numel *= d
            ok = 0 <= a <= b and (b - a) == numel * DTYPES[e["dtype"]].itemsize
        if not ok:
            raise ShardError(f"{path}: header entry {name!r} is malformed")
        if start + e["data_offsets"][1] > size:
            raise ShardError(f"{path} is truncated: {name} ends past the end of the file")
    return header, start


class SafetensorsFolder:
    """The tensors of a transformers checkpoint folder (``model.safetensors`` or a sharded index), read on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = read_json(index)["weight_map"]
                assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
            except (ValueError, KeyError, TypeError, AssertionError):  # JSONFileError is a ValueError
                raise ShardError(f"{index} is not a safetensors index (a JSON object with a weight_map)") from None
        elif single.is_file():
            weight_map = None
        else:
            raise ShardError(f"{self.folder} holds no model.safetensors nor model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map is not None else [single.name]
        self._files: dict[str, object] = {}
        self._where: dict[str, tuple[str, dict, int]] = {}
        try:
            for name in files:
                path = self.folder / name
                if "/" in name or not path.is_file():
                    raise ShardError(f"{index.name} names the shard {name}, which is missing from {self.folder}")
                f = self._files[name] = open(path, "rb")
                header, start = read_header(f, path)
                for t, e in header.items():
                    if weight_map is None or weight_map.get(t) == name:
                        self._where[t] = (name, e, start)
            if weight_map is not None:
                lost = [t for t in weight_map if t not in self._where]
                if lost:
                    raise ShardError(f"{index.name} puts {lost[0]} in {weight_map[lost[0]]}, which does not hold it"
                                     + (f" ({len(lost)} tensors so)" if len(lost) > 1 else ""))
        except BaseException:
            self.close()
            raise

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def nbytes(self) -> int:
        """Bytes of tensor data in the folder's shards."""
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for _, e, _ in self._where.values())

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, in memory of its own."""
        if name not in self._where:
            raise KeyError(name)
        file, e, start = self._where[name]
        a, b = e["data_offsets"]
        out = torch.empty(b - a, dtype=torch.uint8)
        if b > a:
            f = self._files[file]
            f.seek(start + a)
            got = f.readinto(out.numpy())
            if got != b - a:
                raise ShardError(f"{self.folder / file} ended while reading {name}")
        return out.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``limit`` bytes as they are added (the first tensor of a
    shard may exceed it alone). Each shard's data goes to a ``.tmp`` file first; ``finish`` writes the shards with
    their headers, wider dtypes first, and returns them. The caller owns ``made`` (every file written) for cleanup."""

    def __init__(self, directory: Path, prefix: str, limit: int, metadata: dict[str, str]):
        self.directory, self.prefix, self.limit, self.metadata = directory, prefix, limit, metadata
        self.parts: list[dict] = []
        self.made: list[Path] = []
        self._out = None

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in NAMES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        if not self.parts or (self.parts[-1]["entries"] and self.parts[-1]["size"] + nbytes > self.limit):
            self._close_part()
            path = self.directory / f"{self.prefix}-{len(self.parts) + 1:05d}.data.tmp"
            self.made.append(path)
            self._out = open(path, "wb")
            self.parts.append({"data": path, "entries": [], "size": 0})
        part = self.parts[-1]
        part["entries"].append((name, NAMES[t.dtype], list(t.shape), part["size"], nbytes))
        if nbytes:
            self._out.write(_bytes_of(t))
        part["size"] += nbytes

    def _close_part(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def finish(self, name_of) -> list[dict]:
        """Write the shards (``name_of(i, n)`` names shard i of n) and return {file, sha256, bytes, tensors} each."""
        self._close_part()
        shards = []
        for i, part in enumerate(self.parts):
            final = self.directory / name_of(i, len(self.parts))
            tmp = final.with_name(final.name + ".tmp")
            self.made += [tmp, final]
            shards.append(self._write(part, tmp))
            fsync(tmp)
            os.replace(tmp, final)
            part["data"].unlink()
            shards[-1]["file"] = final.name
        return shards

    def _write(self, part: dict, path: Path) -> dict:
        # Wider element types first, in the order they came within one width: every tensor starts at a multiple
        # of its element size (the header is padded to 8 bytes), which is what an in-place memory map needs.
        order = sorted(part["entries"], key=lambda e: -DTYPES[e[1]].itemsize)
        header, pos = {"__metadata__": self.metadata}, 0
        for name, dtype, shape, _, nbytes in order:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        h = hashlib.sha256()
        with open(path, "wb") as out, open(part["data"], "rb") as data:
            for chunk in (struct.pack("<Q", len(text)), text):
                out.write(chunk)
                h.update(chunk)
            for _, _, _, offset, nbytes in order:
                data.seek(offset)
                while nbytes:
                    chunk = data.read(min(nbytes, 1 << 24))
                    out.write(chunk)
                    h.update(chunk)
                    nbytes -= len(chunk)
            size = out.tell()
        return {"sha256": h.hexdigest(), "bytes": size, "tensors": [e[0] for e in part["entries"]]}


def fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def map_tensors(path: str, size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a safetensors file, each tensor a view of one private (copy-on-write) map of the file
    where its offset is aligned for its dtype, else a copy. Pages are read when first touched."""
    with open(path, "rb") as f:
        header, start = read_header(f, path)
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    out = {}
    for name, e in header.items():
        dtype, (a, b) = DTYPES[e["dtype"]], e["data_offsets"]
        at = start + a
        if at % dtype.itemsize == 0:
            t = torch.empty(0, dtype=dtype).set_(storage, at // dtype.itemsize, e["shape"])
        else:  # written by a tool that does not align (never by lowbit or safetensors)
            t = torch.empty(0, dtype=torch.uint8).set_(storage, at, (b - a,)).clone().view(dtype).reshape(e["shape"])
        out[name] = t
    return header, out
