"""What every lowbit layer shares: construction from nn.Linear or GPT-2 Conv1D, bias, accounting."""
from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import nn

from lowbit.config import check_compute_dtype
from lowbit.kernels import fast, ops
from lowbit.kernels.layouts import LutLayout
from lowbit.kernels.matmul import few_rows_call, gemm_dtype, lut_linear, lut_plan
from lowbit.kernels.reference import dense_linear

_scratch = threading.local()

# Backward rebuilds the weight in tiles of rows this large (16 MiB: one tile for a 135M model's layers, 12 for a
# 4096 x 11008 one). Its GEMMs reduce over a tile's rows, so small (L2-sized) tiles mean short reductions and one
# extra pass over the [M, in] gradient per tile: 1.4x slower at 576 x 1536, M = 1024 (measured, 2026-12-02).
BACKWARD_TILE_BYTES = 16 << 20
WHOLE_MIN_ROWS = 128  # see DequantLinear._dequantize_whole


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
    weight = getattr(emb, "weight", None)  # a lowbit QuantEmbedding has none: its head, if tied, is quantized
    return set() if weight is None else {id(weight)}


def check_plain_linear(module: nn.Module, name: str) -> None:
    """Raise ValueError if ``module`` computes more than x @ W^T + b: a b1.58-trained layer normalises its input,
    which a weight alone (merged, re-quantized or exported) would drop."""
    if getattr(module, "input_norm", False):
        raise ValueError(f"{name} normalises its input (a layer trained as BitNet b1.58): it cannot be turned into "
                         "a plain weight without changing what the model computes")


def check_range(t: torch.Tensor, name: str, low: float | None = None, high: float | None = None) -> None:
    """Raise ValueError unless every value of ``t`` is finite (floats) and within [low, high] (where given)."""
    if t.numel() == 0:
        return
    # One pass for both bounds; NaN propagates into them, and an inf is one of them.
    lo, hi = (v.item() for v in torch.aminmax(t.reshape(-1)))
    if t.is_floating_point() and not math.isfinite(lo + hi):
        raise ValueError(f"{name} holds NaN or inf")
    if low is not None and lo < low:
        raise ValueError(f"{name} holds {lo:g}, below its format's {low:g}")
    if high is not None and hi > high:
        raise ValueError(f"{name} holds {hi:g}, above its format's {high:g}")


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module that holds what ``name`` names in ``model``, its attribute name there): for ``"a.b.weight"``,
    ``(model.a.b, "weight")``; for a name without a dot, ``(model, name)``. The submodule, parameter or buffer itself
    need not exist (only its owner must)."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def replace_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put ``layer`` where the submodule called ``name`` is."""
    parent, child = owner_of(model, name)
    setattr(parent, child, layer)


class FrozenWeightMatmul(torch.autograd.Function):
    """y = layer(x) for a layer whose quantized weight is frozen. Backward gives only x's gradient, rebuilt from the
    packed weight tile by tile: nothing is saved between forward and backward (no input, no dequantized weight).

    Layers that quantize their input too (LLM.int8, b1.58) get the straight-through gradient, dy @ dequantize():
    the rounding of x counts as the identity, the convention of quantization-aware training."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer, ctx.shape, ctx.dtype = layer, x.shape, x.dtype
        return layer.quantized_forward(x)  # autograd is off in here: the inference kernels run

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        layer = ctx.layer
        grad_x = layer.input_grad(grad_y.reshape(-1, layer.out_features))
        return grad_x.to(ctx.dtype).reshape(ctx.shape), None


class QuantLinear(nn.Module):
    """Base of lowbit's drop-in replacements for nn.Linear; subclasses hold only quantized weights.

    Subclasses define ``quantized_forward``; under autograd it runs inside ``FrozenWeightMatmul``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype) -> None:
        super().__init__()
        check_compute_dtype(compute_dtype)  # what a checkpoint can name and load back
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self._op_handle = ops.register(self)  # what names this layer in lowbit's custom ops (torch.compile)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._op_handle = ops.register(self)  # a copy (deepcopy, pickle) is another layer: it gets its own handle

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

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight in float32, rebuilt from those rows alone (for embedding tables); formats
        whose rows cannot be read apart raise TypeError."""
        raise TypeError(f"{type(self).__name__} cannot be read row by row")

    def check_values(self) -> None:
        """Raise ValueError unless every stored value is one the format can hold: what a loader runs on tensors it did
        not make, so that no kernel meets a value the reference path would refuse or read differently. This base
        checks that every float tensor is finite; layers add their codes' ranges and their scales' signs."""
        for name, b in self.named_buffers():
            if b.is_floating_point():
                check_range(b, name)

    def stored_bits(self) -> int:
        """Bits of every stored tensor of the weight (codes and constants), bias excluded."""
        return sum(b.numel() * b.element_size() * 8 for name, b in self.named_buffers() if name != "bias")

    def bits_per_param(self) -> float:
        """Stored weight bits per weight parameter."""
        return self.stored_bits() / (self.in_features * self.out_features)

    @property
    def qweight(self) -> torch.Tensor:
        """The main stored tensor of the quantized weight (its codes): where the layer lives, for PEFT and others."""
        return next(b for name, b in self.named_buffers() if name != "bias")

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque custom op in the graph (lowbit.kernels.ops), autograd included
            self._check_input(x)
            return ops.quantized_linear(x, [b for _, b in self.named_buffers()], self._op_handle)
        if needs_autograd(x):
            self._check_input(x)
            return FrozenWeightMatmul.apply(x, self)
        return self.quantized_forward(x, **kwargs)

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b with the quantized weight (no autograd)."""
        raise NotImplementedError

    def decode_call(self):
        """A function computing ``forward`` for a decode loop (no autograd, buffers unchanged while it is used):
        where a layer can, the kernel and its arguments are looked up once instead of at every token."""
        return self.forward

    def decode_weight(self) -> Any:
        """This layer's weight as lowbit's native decode step multiplies it (a ``DecodeWeight`` of the compiled
        kernels, ``lowbit.decode.native``), or None where that step has no kernel for it."""
        return None

    def _bound_gemv(self, gemv):
        # gemv computes what quantized_forward computes for a few float32 rows (same kernel, then the bias)
        bias = None if self.bias is None else self.bias.float()
        return few_rows_call(gemv, self.in_features, self.out_features, bias, self.forward)

    def tile_rows(self, dtype: torch.dtype = torch.float32) -> int:
        """Rows of the weight in one backward tile (``BACKWARD_TILE_BYTES``)."""
        return max(16, BACKWARD_TILE_BYTES // (self.in_features * torch.empty((), dtype=dtype).element_size()))

    def row_ranges(self, dtype: torch.dtype):
        """(r0, r1) of each backward tile of rows."""
        rows = self.tile_rows(dtype)
        return [(r0, min(r0 + rows, self.out_features)) for r0 in range(0, self.out_features, rows)]

    def weight_tiles(self, dtype: torch.dtype):
        """Yield (r0, r1, W[r0:r1] as ``dtype``) covering the weight, columns in ``tile_column_order()``; this
        default rebuilds it in one piece."""
        yield 0, self.out_features, self.dequantize().to(dtype)

    def tile_column_order(self) -> torch.Tensor | None:
        """Where the tiles' columns come from (original column per tile column, -1 for padding); None: in order."""
        return None

    def input_grad(self, grad_y: torch.Tensor) -> torch.Tensor:
        """dL/dx [M, in] = grad_y [M, out] @ W, W rebuilt one tile of rows at a time."""
        dtype = gemm_dtype(self.compute_dtype)
        order = self.tile_column_order()
        g, grad = grad_y.to(dtype), None
        for r0, r1, w in self.weight_tiles(dtype):
            if grad is None:
                grad = (g[:, r0:r1] @ w).float()
            elif dtype == torch.float32:
                grad.addmm_(g[:, r0:r1], w)  # in place: no product temporary per tile
            else:  # bf16 products, summed over tiles in fp32
                grad += (g[:, r0:r1] @ w).float()
        if order is None:
            return grad
        # Tile columns are in the kernel's lane order (padding past the row's end): one gather puts them back.
        source = torch.empty(self.in_features, dtype=torch.long, device=grad_y.device)
        valid = order >= 0
        source[order[valid]] = valid.nonzero().squeeze(1).to(grad_y.device)
        return grad.index_select(1, source)

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

    def lut_weight(self) -> LutLayout | None:
        """The weight as the LUT kernels take it (a ``lowbit.kernels.layouts`` layout), or None where they do not
        apply."""
        return None

    def _lut_kernels(self):
        """(layout, compiled kernels) where the CPU kernels take this layer's weight, else None."""
        lut = self.lut_weight() if self.qweight.device.type == "cpu" else None
        ext = fast() if lut is not None and lut.fits_kernel() else None
        return None if ext is None else (lut, ext)

    def _row_kernel(self):
        """(layout, compiled kernels) where backward rebuilds rows on the kernels, else None: also for weights of
        one backward tile, which ``dequantize`` rebuilds whole in column order (no lane-order gather after)."""
        if self.in_features * self.out_features * 4 <= BACKWARD_TILE_BYTES:
            return None
        return self._lut_kernels()

    def tile_column_order(self) -> torch.Tensor | None:
        # The compiled kernel rebuilds rows in its lane order (columns permuted): input_grad puts them back.
        kernel = self._row_kernel()
        if kernel is None:
            return None
        lut, ext = kernel
        return ext.lut_permute_x(torch.arange(1, self.in_features + 1, dtype=torch.float32)[None], lut.bits)[0].long() - 1

    def weight_tiles(self, dtype: torch.dtype):
        kernel = self._row_kernel()
        if kernel is None:
            yield 0, self.out_features, self.dequantize(dtype)
            return
        lut, ext = kernel
        plan, tile = lut.plan(ext), None
        for r0, r1 in self.row_ranges(dtype):
            if tile is None:  # one buffer for every tile, as wide as the kernel's padded rows
                width = ext.lut_permute_x(torch.zeros(1, self.in_features), lut.bits).shape[1]
                tile = torch.empty(r1 - r0, width, dtype=dtype)
            plan.dequant_rows(r0, r1, tile)
            yield r0, r1, tile[:r1 - r0]

    def decode_plan(self):
        """The kernel's plan of this layer's weight for a decode loop (``lowbit.kernels.matmul.lut_plan``), or None
        where the kernels do not take it."""
        kernels = self._lut_kernels()
        return None if kernels is None else lut_plan(kernels[1], kernels[0], self.compute_dtype)

    def decode_weight(self) -> Any:
        kernels = self._lut_kernels()
        if kernels is None:
            return None
        lut, ext = kernels
        return ext.DecodeWeight.lut(lut_plan(ext, lut, self.compute_dtype), lut.N, lut.K, self.bias)

    def decode_call(self):
        plan = self.decode_plan()
        return self.forward if plan is None else self._bound_gemv(plan.gemv)

    def _dequantize_whole(self, x: torch.Tensor) -> bool:
        # From 128 rows of x, with a weight of at most BACKWARD_TILE_BYTES: dequantizing it whole (in column order)
        # and one GEMM beat the kernels' tiles, which need x permuted to their lane order. NF4 at 576 x 1536:
        # 5.6 vs 7.2 ms at 512 rows, 1.9 vs 2.0 at 128, 1.0 vs 0.7 at 16 (2026-12-02, CPU B). Larger weights keep
        # the tiles, which stay in cache.
        rows = x.numel() // max(1, x.shape[-1])
        return rows >= WHOLE_MIN_ROWS and self.in_features * self.out_features * 4 <= BACKWARD_TILE_BYTES

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        cpu_inference = x.device.type == "cpu" and not needs_autograd(x)
        lut = self.lut_weight() if cpu_inference and not self._dequantize_whole(x) else None
        if lut is not None:
            y = lut_linear(x.reshape(-1, self.in_features), lut, self.compute_dtype, self.bias)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        shape = (self.out_features, self.in_features)
        # The GEMM's dtype: compute_dtype, or bf16 for a float32 layer inside lowbit.kernels.fast_prefill().
        dtype = gemm_dtype(self.compute_dtype) if cpu_inference and self.compute_dtype == torch.float32 else self.compute_dtype
        # Without autograd the weight goes to one reused buffer, not to a fresh allocation per call.
        w = self.dequantize(dtype, scratch(shape, dtype) if cpu_inference else None)
        return dense_linear(x, w, dtype, self.bias).to(x.dtype)
