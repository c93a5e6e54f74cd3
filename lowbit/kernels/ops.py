"""lowbit's quantized linear layers as torch custom ops: what ``torch.compile`` sees of them.

A layer's inference path branches on data (LLM.int8's outlier columns, the finite-input checks, the GEMV / tiled
GEMM choice) and calls compiled kernels that dynamo cannot trace. Under ``torch.compile`` each lowbit layer is
therefore one opaque op, ``lowbit::quantized_linear``, with a fake implementation that gives the output's shape and
dtype: the graph around it (norms, attention, residuals) compiles whole, with no graph break. The op takes the
layer's buffers as inputs (so the compiled graph depends on them as on any weight) and a handle that names the
live layer whose own forward runs. Its backward, ``lowbit::quantized_linear_input_grad``, is the layer's
straight-through input gradient, as in eager mode (``FrozenWeightMatmul``).

Eager calls do not go through the dispatcher (a few microseconds a call that decode pays 200 times a token).
"""
from __future__ import annotations

import itertools
import weakref

import torch

_layers: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_handles = itertools.count()


def register(layer: torch.nn.Module) -> int:
    """A new handle that names ``layer`` in the ops (each layer object, copies included, gets its own)."""
    handle = next(_handles)
    _layers[handle] = layer
    return handle


def layer_of(handle: int) -> torch.nn.Module:
    """The live layer a handle names."""
    layer = _layers.get(handle)
    if layer is None:
        raise RuntimeError(f"lowbit::quantized_linear: layer handle {handle} names no live layer (it was freed)")
    return layer


@torch.library.custom_op("lowbit::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, buffers: list[torch.Tensor], handle: int) -> torch.Tensor:
    """y = layer(x) for the lowbit layer ``handle`` names (``buffers``: its stored tensors, for the graph)."""
    with torch.no_grad():
        return layer_of(handle).quantized_forward(x)


@quantized_linear.register_fake
def _quantized_linear_fake(x: torch.Tensor, buffers: list[torch.Tensor], handle: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], layer_of(handle).out_features))


@torch.library.custom_op("lowbit::quantized_linear_input_grad", mutates_args=())
def quantized_linear_input_grad(grad_y: torch.Tensor, buffers: list[torch.Tensor], handle: int) -> torch.Tensor:
    """dL/dx of ``quantized_linear``: grad_y @ W with W rebuilt from the packed weight (straight-through)."""
    layer = layer_of(handle)
    with torch.no_grad():
        grad = layer.input_grad(grad_y.reshape(-1, layer.out_features))
    return grad.to(grad_y.dtype).reshape(*grad_y.shape[:-1], layer.in_features)


@quantized_linear_input_grad.register_fake
def _input_grad_fake(grad_y: torch.Tensor, buffers: list[torch.Tensor], handle: int) -> torch.Tensor:
    return grad_y.new_empty((*grad_y.shape[:-1], layer_of(handle).in_features))


def _setup_context(ctx, inputs, output) -> None:
    x, buffers, handle = inputs
    ctx.handle, ctx.dtype = handle, x.dtype
    ctx.save_for_backward(*buffers)


def _backward(ctx, grad_y: torch.Tensor):
    buffers = list(ctx.saved_tensors)
    grad = quantized_linear_input_grad(grad_y, buffers, ctx.handle)
    return grad.to(ctx.dtype), [None] * len(buffers), None  # the weights are frozen: no gradient


quantized_linear.register_autograd(_backward, setup_context=_setup_context)
