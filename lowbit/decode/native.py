"""lowbit's native decode step: one token of a ``StaticDecoder``'s model in one compiled call.

The step (lowbit/kernels/csrc/engine.cpp) runs the norms, q/k/v, the rotation, attention over the decoder's own KV
cache, o, the MLP and the head in one thread team kept for the whole token, where the Python step makes a torch
call per operation and a parallel region per product. It takes one sequence in float32 compute whose every linear
layer is a lowbit LUT layer (NF4, FP4, int4/int2/int3, SpQR, GGUF codes), a weight-only int8 layer, a packed
ternary layer (BitNet b1.58: its own per-token int8 activations, as ``BitLinear`` computes them) or a float32
``nn.Linear``; the decoder keeps its Python step for anything else and says why (``StaticDecoder.native_why``).
``LOWBIT_NATIVE=0`` turns it off (to compare the two).

Activations: by default the 4-bit LUT weights (NF4, FP4, int4 groups, GGUF Q4_0/Q4_1) multiply activations
quantized to int8 per block of 8 on the VNNI kernels (``lowbit.kernels.reference.lut_linear_int8x`` is their
arithmetic), as llama.cpp does per block of 32; the cost in perplexity is measured by benchmarks/bench_fast_paths.py and
docs/speed.md. ``LOWBIT_DECODE_ACTIVATIONS=float32`` keeps the exact float32 path (``int8`` or ``auto``: the default).
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

from lowbit.kernels import fast
from lowbit.nn import QuantLinear

ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # transformers' names -> the engine's


Step = Callable[[torch.Tensor, int], torch.Tensor]
StaticDecoderLike = Any  # lowbit.decode.decoder.StaticDecoder, which imports this module


def decode_weight(ext: ModuleType, module: nn.Module) -> Any:
    """``module``'s weight as the native step multiplies it (``ext.DecodeWeight``), or None where it has no kernel
    for it."""
    if isinstance(module, QuantLinear):
        return module.decode_weight()
    if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
        return ext.DecodeWeight.dense(module.weight.detach().contiguous(), module.bias)
    return None


def enabled() -> bool:
    """Whether the native step may run (``LOWBIT_NATIVE=0`` turns it off)."""
    return os.environ.get("LOWBIT_NATIVE", "1").strip() not in ("0", "off", "false", "no")


ACTIVATION_PATHS = ("auto", "int8", "float32")


def int8_activations() -> bool:
    """Whether the native step quantizes the activations of the 4-bit weights to int8 (``LOWBIT_DECODE_ACTIVATIONS``)."""
    choice = os.environ.get("LOWBIT_DECODE_ACTIVATIONS", "").strip().lower() or "auto"
    if choice not in ACTIVATION_PATHS:
        raise ValueError(f"LOWBIT_DECODE_ACTIVATIONS={choice!r}: expected one of {', '.join(ACTIVATION_PATHS)}")
    return choice != "float32"


def native_step(decoder: StaticDecoderLike) -> tuple[Step | None, str | None]:
    """(step(x [hidden] embedded token, position) -> logits [1, vocab], None) for a ``StaticDecoder`` of one sequence,
    or (None, why not in one line)."""
    ext = fast()
    if not enabled():
        return None, "LOWBIT_NATIVE=0"
    if ext is None or not hasattr(ext, "DecodeEngine"):
        return None, "no compiled kernels"
    if decoder.dtype != torch.float32 or decoder.cos.device.type != "cpu":
        return None, f"{decoder.dtype} compute on {decoder.cos.device.type} (the native step runs float32 on CPU)"
    config = decoder.config
    name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    act = ACTIVATIONS.get(name)
    if act is None:
        return None, f"the {name} activation"
    parts = decoder.parts
    norms = [p.norm1 for p in parts] + [p.norm2 for p in parts] + [decoder.final_norm]
    if len({n.eps for n in norms}) > 1 or len({p.scaling for p in parts}) > 1:
        return None, "norms or attention scales that differ between layers"
    if len({p.down.in_features for p in parts}) > 1:
        return None, "MLP widths that differ between layers"
    try:
        return _bind(ext, decoder, act, norms[0].eps)
    except RuntimeError as e:  # a weight the engine's checks refuse: the Python step runs it
        return None, f"the native step refused the model ({str(e).splitlines()[0]})"


def _bind(ext: ModuleType, decoder: StaticDecoderLike, act: str, eps: float) -> tuple[Step | None, str | None]:
    parts = decoder.parts
    head = decode_weight(ext, decoder.lm_head)
    int8_x = int8_activations()
    engine = ext.DecodeEngine(decoder.hidden, decoder.heads, decoder.kv_heads, decoder.head_dim, decoder.intermediate,
                              eps, parts[0].scaling, act, decoder.cos, decoder.sin,
                              decoder.final_norm.gain, head, int8_x)
    int8_weights = 0  # weights the step multiplies by int8 activations
    for p, blk in zip(parts, decoder.blocks):
        weights = {}
        for name, modules in (("qkv", p.qkv), ("o", (p.o,)), ("gate_up", p.gate_up), ("down", (p.down,))):
            weights[name] = [decode_weight(ext, m) for m in modules]
            missing = [type(m).__name__ for m, w in zip(modules, weights[name]) if w is None]
            if missing:
                return None, f"{missing[0]} layers (no native kernel: {', '.join(sorted(set(missing)))})"
        engine.add_layer(p.norm1.gain, p.norm2.gain, weights["qkv"], weights["o"][0], weights["gate_up"],
                         weights["down"][0], blk["k_cache"][0], blk["v_cache"][0])
        int8_weights += sum(w.takes_int8_x for ws in weights.values() for w in ws) if int8_x else 0
    head_call = decoder.head

    def step(x: torch.Tensor, pos: int) -> torch.Tensor:
        out = engine.step(x, pos)
        return out[None] if head is not None else head_call(out[None]).float()
    step.int8_weights = int8_weights
    return step, None
