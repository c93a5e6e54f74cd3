"""Where optimizer state lives: 8-bit blockwise codes (dynamic map, per-block absmax) or fp32, in memory or paged
to a file and read back one parameter at a time."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from lowbit.formats.codebooks import codebook
from lowbit.kernels import fast, reference

_MAPS = {True: codebook("dynamic"), False: codebook("dynamic_unsigned")}


def quantize_state(x: torch.Tensor, signed: bool, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes on the signed (first moment) or unsigned (second moment) dynamic map, and per-block absmax."""
    flat = x.reshape(-1).float().contiguous()
    ext = fast()
    if ext is not None:
        absmax = torch.empty(-(-flat.numel() // blocksize), dtype=torch.float32)
        return ext.quantize_blockwise(flat, blocksize, _MAPS[signed], absmax), absmax
    return reference.quantize_blockwise(flat, blocksize, _MAPS[signed])


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, blocksize: int,
                     shape: torch.Size) -> torch.Tensor:
    """The float32 state of ``shape`` from its codes and absmax."""
    ext = fast()
    if ext is not None:
        out = torch.empty(shape, dtype=torch.float32)
        ext.dequantize_blockwise(codes, absmax, _MAPS[signed], blocksize, out.view(-1))
        return out
    return reference.dequantize_blockwise(codes, absmax, _MAPS[signed], blocksize, torch.float32).view(shape)


class PagedStore:
    """Optimizer state tensors kept in a file outside the process's memory; ``get`` reads one back, ``put``
    writes it. Each key keeps its own region of the file (sizes never change after the first ``put``)."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        directory = Path(directory or tempfile.gettempdir())
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="lowbit-optim-", suffix=".state", dir=directory)
        self.path = Path(name)
        self._file = os.fdopen(fd, "r+b")
        # The open file outlives its name: with the name gone at once, a process that is killed (a rank of a
        # distributed run, an out-of-memory kill) leaves no state file behind; the system frees it on exit.
        self.path.unlink()
        self._where: dict[str, tuple[int, torch.dtype, torch.Size]] = {}
        self._end = 0

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def put(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if key not in self._where:
            self._where[key] = (self._end, t.dtype, t.shape)
            self._end += nbytes
        offset, dtype, shape = self._where[key]
        if dtype != t.dtype or shape != t.shape:
            raise ValueError(f"paged state {key}: {t.dtype} {tuple(t.shape)} does not match the stored {dtype} {tuple(shape)}")
        self._file.seek(offset)
        self._file.write(t.view(torch.uint8).reshape(-1).numpy().data if nbytes else b"")

    def get(self, key: str) -> torch.Tensor:
        offset, dtype, shape = self._where[key]
        out = torch.empty(shape, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        self._file.seek(offset)
        if nbytes and self._file.readinto(out.view(torch.uint8).reshape(-1).numpy().data) != nbytes:
            raise OSError(f"paged optimizer state file {self.path} is truncated")
        return out

    def nbytes(self) -> int:
        return self._end

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
