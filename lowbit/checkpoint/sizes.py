"""Shard sizes as users write them ("2GB", "500MiB", a byte count): parsed to bytes, checked."""
from __future__ import annotations

from lowbit.manifest import CheckpointError


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def shard_limit(max_shard_size: int | str) -> int:
    """max_shard_size in bytes, or CheckpointError."""
    try:
        limit = parse_size(max_shard_size)
    except ValueError:
        raise CheckpointError(f"max_shard_size must be a size such as 2GB, 500MB or a byte count, got {max_shard_size!r}") from None
    if limit <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return limit
