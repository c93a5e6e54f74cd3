"""Calibrate a model block by block: each block sees the outputs of the already quantized blocks before it,
so memory holds one block's activations at a time."""
from __future__ import annotations

import resource
import time
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from lowbit.nn.base import is_linear_like, linear_weight, replace_module

# quantize_layer(name, module, hessian) -> the replacement layer
LayerQuantizer = Callable[[str, nn.Module, torch.Tensor], nn.Module]


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks (``model.layers``, ``transformer.h``, ...)."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "layer", "blocks"):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError("cannot find the model's transformer blocks (a ModuleList named layers, h, layer or blocks)")
    return best


@torch.no_grad()
def _block_inputs(model: nn.Module, block: nn.Module, batches: torch.Tensor, chunk: int) -> list[tuple[tuple, dict]]:
    """The positional and keyword arguments the first block receives, ``chunk`` calibration sequences at a time."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(batches), chunk):
            try:
                model(batches[i:i + chunk], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def clip_tokens(x: torch.Tensor, token_clip: float) -> torch.Tensor:
    """Rows of x [tokens, features] scaled down so that none has a squared norm above token_clip x the median's."""
    norms = x.square().sum(1)
    cap = token_clip * norms.median().clamp(min=1e-12)
    return x * (cap / norms.clamp(min=cap)).sqrt().unsqueeze(1)


@torch.no_grad()
def quantize_sequential(model: nn.Module, batches: torch.Tensor, quantize_layer: LayerQuantizer,
                        skip: Callable[[str], bool] = lambda name: False, progress: bool = True,
                        desc: str = "calibrating", chunk: int = 8, token_clip: float | None = None) -> dict:
    """Replace every linear layer inside the blocks, block after block, using Hessians of its real inputs.

    Sequences go through each block ``chunk`` at a time (one weight dequantization per chunk, not per sequence).
    """
    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    inputs = _block_inputs(model, blocks[0], batches, chunk)
    stats = {"layers": 0, "blocks": len(blocks), "samples": len(batches)}
    for b, block in enumerate(tqdm(blocks, desc=desc, disable=not progress)):
        linears = {n: m for n, m in block.named_modules() if is_linear_like(m) and not skip(f"{prefix}.{b}.{n}")}
        hessians = {n: torch.zeros(linear_weight(m).shape[1], linear_weight(m).shape[1]) for n, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def accumulate(name):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                if token_clip:
                    x = clip_tokens(x, token_clip)
                hessians[name].addmm_(x.t(), x)
                counts[name] += x.shape[0]
            return hook

        handles = [m.register_forward_pre_hook(accumulate(n)) for n, m in linears.items()]
        t = time.perf_counter()
        for args, kwargs in inputs:
            block(*args, **kwargs)
        for h in handles:
            h.remove()
        stats["forward_s"] = stats.get("forward_s", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        for name, module in linears.items():
            H = 2 * hessians[name] / max(counts[name], 1)
            replace_module(block, name, quantize_layer(f"{prefix}.{b}.{name}", module, H))
            stats["layers"] += 1
        stats["quantize_s"] = stats.get("quantize_s", 0.0) + time.perf_counter() - t
        # The next block's inputs are this block's outputs, with its layers already quantized.
        t = time.perf_counter()
        inputs = [_with_hidden(args, kwargs, _output(block(*args, **kwargs))) for args, kwargs in inputs]
        stats["forward_s"] += time.perf_counter() - t
    stats["seconds"] = time.perf_counter() - t0
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    return stats
