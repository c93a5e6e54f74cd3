"""Text bundled with lowbit: 'The Python Tutorial' (PSF License, notice in python-tutorial.LICENSE.txt)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_TEXT = Path(__file__).with_name("python-tutorial.txt")


def default_text() -> str:
    """The bundled evaluation text (its first 8192 SmolLM2 tokens are the evaluation windows)."""
    return DEFAULT_TEXT.read_text(encoding="utf-8")
