"""What every lowbit layer shares: construction from nn.Linear or GPT-2 Conv1D, bias, accounting."""
from __future__ import annotations

import threading

import torch
from torch import nn

from lowbit.kernels.matmul import LutWeight, lut_linear

_scratch = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer reused by every layer for its dequantized weight during inference.

    One weight-sized buffer that stays in cache instead of a fresh allocation (and page faults) per call;
    only for calls that autograd will not look back at.
    """
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    n = 1
    for d in shape:
        n *= d
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def needs_autograd(x: torch.Tensor) -> bool:
    """Whether autograd may keep tensors of this call for a backward pass."""
    return torch.is_grad_enabled() and x.requires_grad


def is_linear_like(module: nn.Module) -> bool:
    """True for nn.Linear and transformers' GPT-2 Conv1D."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or of a transformers Conv1D (stored as [in, out])."""
    if not is_linear_like(module):
        raise TypeError(f"cannot quantize {type(module).__name__}: lowbit layers replace nn.Linear and transformers Conv1D")
    return module.weight.detach() if isinstance(module, nn.Linear) else module.weight.detach().t()


def tied_to_embeddings(model: nn.Module) -> set[int]:
    """ids of weights shared with the model's input embedding (their layer must stay as it is)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return set() if emb is None else {id(emb.weight)}


def replace_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put ``layer`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


class QuantLinear(nn.Module):
    """Base of lowbit's drop-in replacements for nn.Linear; subclasses hold only quantized weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    def copy_bias(self, bias: torch.Tensor | None) -> None:
        """Take a float32 copy of the replaced layer's bias, if it has one."""
        if bias is not None:
            self.bias = bias.detach().float().clone()

    def init_kwargs(self) -> dict:
        """The constructor arguments that rebuild this layer empty (JSON types; dtypes by name)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}

    def dequantize(self) -> torch.Tensor:
        """The [out, in] weight this layer stands for, in float32."""
        raise NotImplementedError

    def stored_bits(self) -> int:
        """Bits of every stored tensor of the weight (codes and constants), bias excluded."""
        return sum(b.numel() * b.element_size() * 8 for name, b in self.named_buffers() if name != "bias")

    def bits_per_param(self) -> float:
        """Stored weight bits per weight parameter."""
        return self.stored_bits() / (self.in_features * self.out_features)

    def _finish(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs with {self.in_features} features, got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bits/param={self.bits_per_param():.3f}"


class DequantLinear(QuantLinear):
    """A layer that multiplies by its packed weight on the LUT kernels where they apply (``lut_weight``), else
    rebuilds the weight with ``dequantize(dtype, out)`` and multiplies in compute_dtype."""

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def lut_weight(self) -> LutWeight | None:
        """The weight as the LUT kernels take it, or None where they do not apply."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        cpu_inference = x.device.type == "cpu" and not needs_autograd(x)
        lut = self.lut_weight() if cpu_inference else None
        if lut is not None:
            y = lut_linear(x.reshape(-1, self.in_features), lut, self.compute_dtype)
            return self._finish(y, x.dtype).reshape(*x.shape[:-1], self.out_features)
        shape = (self.out_features, self.in_features)
        # Without autograd the weight goes to one reused buffer, not to a fresh allocation per call.
        w = self.dequantize(self.compute_dtype, scratch(shape, self.compute_dtype) if cpu_inference else None)
        return self._finish(torch.nn.functional.linear(x.to(self.compute_dtype), w), x.dtype)
