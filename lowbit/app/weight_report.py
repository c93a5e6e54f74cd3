"""Weight-only report: quantize every linear weight of a model in each format; print error and bits/param."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from lowbit import functional as F

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def _roundtrip(fmt: str) -> Quantizer:
    if fmt == "int8":
        return lambda w: F.dequantize_absmax(*F.quantize_absmax(w, dim=-1))
    if fmt in ("nf4", "fp4"):
        return lambda w: F.dequantize_4bit(F.quantize_4bit(w, fmt, 64))
    if fmt in ("nf4-dq", "fp4-dq"):
        return lambda w: F.dequantize_4bit(F.quantize_4bit(w, fmt[:3], 64, double_quant=True))
    if fmt == "int4-g64":
        return lambda w: F.dequantize_affine(F.quantize_affine(w, 4, 64))
    if fmt == "int3-g64":
        return lambda w: F.dequantize_affine(F.quantize_affine(w, 3, 64))
    if fmt == "ternary":
        return lambda w: F.dequantize_ternary(*F.quantize_ternary(w), w.shape)
    raise ValueError(f"unknown format {fmt!r}")


def _bits(fmt: str, shape: tuple[int, int]) -> float:
    table = {
        "int8": dict(fmt="int8"),
        "nf4": dict(fmt="nf4"),
        "fp4": dict(fmt="fp4"),
        "nf4-dq": dict(fmt="nf4", double_quant=True),
        "fp4-dq": dict(fmt="fp4", double_quant=True),
        "int4-g64": dict(fmt="intN", bits=4, group_size=64),
        "int3-g64": dict(fmt="intN", bits=3, group_size=64),
        "ternary": dict(fmt="ternary"),
    }
    return F.bits_per_param(shape=shape, **table[fmt])


FORMATS = ("int8", "nf4", "nf4-dq", "fp4", "fp4-dq", "int4-g64", "int3-g64", "ternary")


@dataclass
class Row:
    fmt: str
    bits_per_param: float
    rel_error: float  # ||W - Q(W)||_F / ||W||_F over all weights together
    max_abs_error: float
    megabytes: float


def weight_report(weights: dict[str, torch.Tensor], formats: tuple[str, ...] = FORMATS, progress: bool = True) -> list[Row]:
    """Round-trip every weight through each format; aggregate error and exact storage."""
    from tqdm import tqdm

    rows = []
    total_sq = sum(float(w.float().pow(2).sum()) for w in weights.values())
    n_params = sum(w.numel() for w in weights.values())
    for fmt in formats:
        fn = _roundtrip(fmt)
        err_sq, max_err, bits = 0.0, 0.0, 0.0
        for w in tqdm(weights.values(), desc=f"{fmt:>9}", disable=None if progress else True, leave=False):
            d = (fn(w) - w.float())
            err_sq += float(d.pow(2).sum())
            max_err = max(max_err, float(d.abs().max()))
            bits += _bits(fmt, tuple(w.shape)) * w.numel()
        rows.append(Row(fmt, bits / n_params, math.sqrt(err_sq / total_sq), max_err, bits / 8 / 2**20))
    return rows


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The 2-D weights of every nn.Linear except the LM head."""
    return {
        name: m.weight.detach()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    }


def main() -> None:
    """Load the bundled SmolLM2-135M, run the weight report and print it as a table."""
    from rich.console import Console
    from rich.table import Table

    from lowbit.app.models import load_default_model

    console = Console()
    with console.status("loading SmolLM2-135M (first run converts the GGUF, ~30 s)"):
        model, _ = load_default_model()
    weights = linear_weights(model)
    n = sum(w.numel() for w in weights.values())
    rows = weight_report(weights)
    table = Table(title=f"SmolLM2-135M: {len(weights)} linear weights, {n / 1e6:.1f}M parameters (fp32: {n * 4 / 2**20:.0f} MiB)")
    for col in ("format", "bits/param", "MiB", "relative error", "max |error|"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.fmt, f"{r.bits_per_param:.3f}", f"{r.megabytes:.1f}", f"{r.rel_error:.4f}", f"{r.max_abs_error:.4f}")
    console.print(table)
    console.print(
        "relative error = ||W - Q(W)|| / ||W|| over all linear weights. Caveat: this GGUF stores weights on a "
        "Q4_1 grid (asymmetric 4-bit, blocks of 32), so 4-bit errors here are lower than on a true fp16 model."
    )


if __name__ == "__main__":
    main()
