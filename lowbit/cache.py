"""Where lowbit keeps built kernels and converted models."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: $LOWBIT_CACHE, else ~/.cache/lowbit."""
    path = Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")
    path.mkdir(parents=True, exist_ok=True)
    return path
