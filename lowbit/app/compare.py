"""Measure what each quantization method costs on one model: bits/param, size, perplexity, speed."""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from lowbit.eval.memory import memory_report
from lowbit.eval.perplexity import perplexity
from lowbit.eval.speed import speed
from lowbit.app.methods import LOADED, apply_method, check_method, describe, needs_calibration
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.quantize import eligible_layers
from lowbit.config import NF4Config


def linear_bits_per_param(model: nn.Module) -> float:
    """Stored bits per weight of the layers a method quantizes (codes and every constant); 32 or 16 if none are."""
    rows = {id(m.rows) for m in model.modules() if isinstance(m, QuantEmbedding)}  # an embedding table, not a layer
    q = [m for m in model.modules() if isinstance(m, QuantLinear) and id(m) not in rows]
    if q:
        return sum(m.stored_bits() for m in q) / sum(m.in_features * m.out_features for m in q)
    layers = eligible_layers(model, NF4Config())
    return 8.0 * layers[0][1].weight.element_size() if layers else float("nan")


def measure(model: nn.Module, tokenizer, text: str, tokens: int = 8192, window: int = 512, stride: int | None = None,
            with_speed: bool = True, progress: bool = True, label: str = "") -> dict:
    """Perplexity, memory and (optionally) prefill/decode speed of one model."""
    mem = memory_report(model)
    row = {"bits_per_param_linear": linear_bits_per_param(model), "bits_per_param_model": mem["bits_per_param"],
           "model_mb": mem["total_bytes"] / 1e6, "parameters": mem["parameters"], "bytes_by_type": mem["bytes_by_type"]}
    t = time.perf_counter()
    row["perplexity"] = perplexity(model, tokenizer, text, tokens, window, stride, progress=progress)
    row["tokens"] = min(tokens, len(tokenizer(text, verbose=False).input_ids))  # what was scored, not what was asked
    row["perplexity_s"] = time.perf_counter() - t
    if with_speed:
        row.update(speed(model))
    return row


def compare(model: nn.Module, tokenizer, methods: list[str], text: str, tokens: int = 8192, window: int = 512,
            stride: int | None = None, with_speed: bool = True, progress: bool = True,
            calibration: torch.Tensor | None = None, native: Callable[[], nn.Module] | None = None) -> list[dict]:
    """One row per method, each on a fresh copy of ``model`` (left as it is); ppl change is against fp32 if present.

    GPTQ and SpQR calibrate on ``calibration`` (default: 32 x 512 tokens of ``text`` past the scored ones).
    ``native`` loads the model in its GGUF file's own quantized weights, for the method of that name.
    """
    for m in methods:
        check_method(m)
    if calibration is None and any(needs_calibration(m) for m in methods):
        from lowbit.calibrate import calibration_batches

        calibration = calibration_batches(tokenizer, text, skip_tokens=max(tokens, 8192))
    rows = []
    for name in tqdm(methods, desc="methods", disable=None if progress else True):
        t = time.perf_counter()
        if name in LOADED:
            if native is None:
                raise ValueError(f"{name} needs the model's GGUF file: give smollm2-135m or a .gguf file")
            m = native()
        else:
            m = apply_method(copy.deepcopy(model), name, progress=progress, calibration=calibration)
        quantize_s = time.perf_counter() - t
        row = {"method": name, "description": describe(name), "quantize_s": quantize_s,
               **measure(m, tokenizer, text, tokens, window, stride, with_speed, progress)}
        rows.append(row)
        del m
    base = next((r["perplexity"] for r in rows if r["method"] == "fp32"), None)
    for r in rows:
        r["ppl_change_pct"] = None if base is None else 100 * (r["perplexity"] / base - 1)
    return rows


def bit_probe(model: nn.Module, tokenizer, text: str, tokens: int = 2048, window: int = 512,
              progress: bool = True, base: float | None = None) -> dict:
    """Perplexity ratios (quantized / as loaded) of 8- and 4-bit round-to-nearest in groups of 128, each on a copy of
    ``model``: how steeply it loses from 8 to 4 bits, the hard-case sign `lowbit eval` reports. ``base``: the
    model's own perplexity on the same tokens and windows, when the caller has it already."""
    if base is None:
        base = perplexity(model, tokenizer, text, tokens, window, progress=progress)
    out = {"tokens": tokens, "perplexity": base}
    for bits in (8, 4):
        q = apply_method(copy.deepcopy(model), f"rtn{bits}", progress=progress)
        out[f"ratio{bits}"] = perplexity(q, tokenizer, text, tokens, window, progress=progress) / base
        del q
    return out
