"""Bounded JSON reading for files lowbit did not necessarily write (lowbit.json, plans, config.json, ...).

``json.loads`` recurses once per nesting level (in C and in Python alike), so a file of 100,000 ``[`` raises
RecursionError, and a multi-gigabyte file is read whole into memory: both are checked before it parses. Every
failure is a ``JSONFileError`` (a ValueError) of one line naming the file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

# lowbit.json lists every tensor of every shard: a few MB for models of hundreds of billions of parameters, and
# safetensors caps its own JSON headers at 100 MB. 64 MiB admits any real manifest, plan or config with room to
# spare, yet refuses a file that is not one before it is read into memory.
MAX_BYTES = 64 * 2**20
# lowbit's manifests and plans nest at most 5 levels, transformers' configs fewer; 64 is far from both, and far
# from the interpreter's recursion limit (1000) that the parser and the code walking its result both draw on.
MAX_DEPTH = 64

# A JSON string (escapes included) or one bracket: brackets inside strings are skipped with their string.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPENERS = frozenset("[{")


class JSONFileError(ValueError):
    """JSON that cannot be read within bounds, or is not JSON: the one-line message names its source."""


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """How deeply ``text``'s arrays and objects nest (outside strings), counted without recursion; the count
    stops as soon as it passes ``limit``."""
    depth = deepest = 0
    for m in _TOKEN.finditer(text):
        token = m.group()
        if token in _OPENERS:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif token in "]}":
            depth -= 1
    return deepest


def loads_bounded(text: str | bytes, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)`` of JSON nested at most ``max_depth`` deep; JSONFileError naming ``what`` otherwise."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONFileError(f"{what} is not valid JSON (not UTF-8 text: {e})") from None
    if nesting_depth(text, max_depth) > max_depth:
        raise JSONFileError(f"{what} is too deeply nested (JSON deeper than {max_depth} levels)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONFileError(f"{what} is not valid JSON ({e})") from None


def read_json(path: str | os.PathLike, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in the file ``path``, of at most ``max_bytes`` and ``max_depth`` levels; JSONFileError naming
    the file otherwise (OSError where it cannot be read at all)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # never more than the bound into memory, whatever the file's size
    if len(data) > max_bytes:
        raise JSONFileError(f"{path} is larger than {max_bytes:,} bytes: too large for the JSON file expected here")
    return loads_bounded(data, str(path), max_depth)


__all__ = ["JSONFileError", "MAX_BYTES", "MAX_DEPTH", "loads_bounded", "nesting_depth", "read_json"]
