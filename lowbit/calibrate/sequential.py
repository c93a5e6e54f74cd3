"""Calibrate a model block by block: each block sees the outputs of the already quantized blocks before it,
so memory holds one block's activations at a time."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from lowbit.eval.memory import peak_rss_bytes
from lowbit.nn.base import is_linear_like, linear_weight, replace_module

# quantize_layer(name, module, hessian) -> the replacement layer
LayerQuantizer = Callable[[str, nn.Module, torch.Tensor], nn.Module]
BlockHook = Callable[[int, nn.Module], None]


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
def block_inputs(model: nn.Module, block: nn.Module, batches: torch.Tensor, chunk: int) -> list[tuple[tuple, dict]]:
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


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def clip_tokens(x: torch.Tensor, token_clip: float) -> torch.Tensor:
    """Rows of x [tokens, features] scaled down so that none has a squared norm above token_clip x the median's."""
    norms = x.square().sum(1)
    cap = token_clip * norms.median().clamp(min=1e-12)
    return x * (cap / norms.clamp(min=cap)).sqrt().unsqueeze(1)


def _input_groups(block: nn.Module, linears: dict[str, nn.Module], args: tuple, kwargs: dict) -> list[list[str]]:
    """The block's linear layers in call order, grouped by the input tensor they share (q/k/v, o, gate/up, down)."""
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, a):
            seen.setdefault(name, a[0])  # the tensor itself: identity, not an address that could be reused
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    for name in seen:
        if stages and seen[stages[-1][0]] is seen[name]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages + [[n] for n in linears if n not in seen]  # never called: nothing to calibrate on


def _passes(groups: list[list[str]], sequential: Callable[[str], bool]) -> list[tuple[list[list[str]], bool]]:
    """The forward passes over a block: the input groups each collects Hessians for, and whether it may stop at the
    next pass's first layer. One pass serves every layer that takes the float block's inputs; each later group of
    ``true_sequential`` layers gets a pass of its own, which sees the groups before it quantized."""
    first, later = [], []
    for i, g in enumerate(groups):
        plain = [n for n in g if not sequential(n)]
        ordered = [n for n in g if sequential(n)]
        if plain or (ordered and i == 0):
            first.append(plain + (ordered if i == 0 else []))
        if ordered and i > 0:
            later.append((i, [ordered]))
    # The first pass runs the whole block if it holds a group past the next pass's.
    first_last = max((i for i, g in enumerate(groups) if any(n in sum(first, []) for n in g)), default=-1)
    passes = [(first, not later or first_last < later[0][0])] if first else []
    return passes + [(p, True) for _, p in later]


@torch.no_grad()
def quantize_sequential(model: nn.Module, batches: torch.Tensor, quantize_layer: LayerQuantizer,
                        skip: Callable[[str], bool] = lambda name: False, progress: bool = True,
                        desc: str = "calibrating", chunk: int = 8,
                        token_clip: float | None | Callable[[str], float | None] = None,
                        true_sequential: bool | Callable[[str], bool] = False, before_block: BlockHook | None = None,
                        after_block: BlockHook | None = None) -> dict:
    """Replace every linear layer inside the blocks, block after block, using Hessians of its real inputs.

    Layers that read the same input share one Hessian (one per ``token_clip`` among them). With
    ``true_sequential`` (as in the GPTQ reference code) a group of them sees the outputs of the groups before it in
    its block already quantized; the forward pass stops at the next group. ``token_clip`` and ``true_sequential``
    may be functions of the layer's full name (a plan's layers each keep their own settings). Sequences go through
    each block ``chunk`` at a time.
    """
    clip_of = token_clip if callable(token_clip) else (lambda name: token_clip)
    sequential_of = true_sequential if callable(true_sequential) else (lambda name: true_sequential)
    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    inputs = block_inputs(model, blocks[0], batches, chunk)
    stats = {"layers": 0, "blocks": len(blocks), "samples": len(batches), "forward_s": 0.0, "quantize_s": 0.0}
    groups_of: dict[tuple[str, ...], list[list[str]]] = {}  # blocks alike share their grouping (one extra forward)
    for b, block in enumerate(tqdm(blocks, desc=desc, disable=None if progress else True)):
        if before_block is not None:
            before_block(b, block)
        linears = {n: m for n, m in block.named_modules() if is_linear_like(m) and not skip(f"{prefix}.{b}.{n}")}
        key = tuple(linears)
        if linears and key not in groups_of:
            groups_of[key] = _input_groups(block, linears, *inputs[0])
        full = {n: f"{prefix}.{b}.{n}" for n in linears}
        passes = _passes(groups_of.get(key, []), lambda n: sequential_of(full[n]))
        for i, (pass_groups, may_stop) in enumerate(passes):
            # One Hessian per input (its group's first layer) and token clip; the hook on that layer collects each.
            clips = {g[0]: sorted({clip_of(full[n]) for n in g}, key=lambda c: (c is not None, c or 0))
                     for g in pass_groups}
            hessians = {(g0, c): torch.zeros(linear_weight(linears[g0]).shape[1], linear_weight(linears[g0]).shape[1])
                        for g0, cs in clips.items() for c in cs}
            counts = dict.fromkeys(clips, 0)

            def accumulate(name):
                def hook(module, args):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    for c in clips[name]:
                        xc = clip_tokens(x, c) if c else x
                        hessians[(name, c)].addmm_(xc.t(), xc)
                    counts[name] += x.shape[0]
                return hook

            def stop(module, args):
                raise _Stop

            handles = [linears[n].register_forward_pre_hook(accumulate(n)) for n in clips]
            if i + 1 < len(passes) and may_stop:  # nothing after this pass's layers is needed yet
                handles.append(linears[passes[i + 1][0][0][0]].register_forward_pre_hook(stop))
            t = time.perf_counter()
            for args, kwargs in inputs:
                try:
                    block(*args, **kwargs)
                except _Stop:
                    pass
            for h in handles:
                h.remove()
            stats["forward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            for g in pass_groups:
                shared = {}  # layers of one input and clip share one Hessian, as one tensor
                for name in g:
                    c = clip_of(full[name])
                    if c not in shared:
                        shared[c] = 2 * hessians[(g[0], c)] / max(counts[g[0]], 1)
                    H = shared[c]
                    try:
                        layer = quantize_layer(full[name], linears[name], H)
                    except (ValueError, RuntimeError) as e:
                        raise type(e)(f"layer {full[name]}: {e} (the model was left unchanged)") from e
                    replace_module(block, name, layer)
                    stats["layers"] += 1
            stats["quantize_s"] += time.perf_counter() - t
        # The next block's inputs are this block's outputs, with its layers already quantized.
        t = time.perf_counter()
        inputs = [with_hidden(args, kwargs, output(block(*args, **kwargs))) for args, kwargs in inputs]
        stats["forward_s"] += time.perf_counter() - t
        linears = hessians = None  # the replaced layers' float weights and the Hessians go before the next block
        if after_block is not None:
            after_block(b, block)
    stats["seconds"] = time.perf_counter() - t0
    stats["peak_rss_mb"] = peak_rss_bytes() / 1e6
    return stats
