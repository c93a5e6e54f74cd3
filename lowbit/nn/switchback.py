"""SwitchBackLinear (Wortsman et al., 2023): int8 training of linear layers. The forward matmul and the
input-gradient matmul run in int8 (row-wise quantized inputs and output gradients, a tensor-wise quantized
weight, so that W and W^T share one scale); the weight gradient, a sum over every token, stays in float."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.functional import quantize_absmax
from lowbit.nn.base import is_linear_like, replace_module, tied_to_embeddings


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] for float a (int8 by row) and float b (int8 by tensor), in float32."""
    aq, a_absmax = quantize_absmax(a, dim=-1)
    bq, b_absmax = quantize_absmax(b, dim=None)
    acc = torch._int_mm(aq, bq)  # int8 x int8 -> int32, exact
    return acc.float() * (a_absmax / 127).unsqueeze(1) * (b_absmax / 127)


class _SwitchBack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = _int8_matmul(x, weight.t())
        return (y if bias is None else y + bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _int8_matmul(grad, weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (grad.t().float() @ x.float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.float().sum(0).to(weight.dtype)
        return gx, gw, gb


class SwitchBackLinear(nn.Linear):
    """nn.Linear trained with SwitchBack's int8 forward and input gradient; same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _SwitchBack.apply(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def from_linear(cls, module: nn.Linear) -> "SwitchBackLinear":
        """A SwitchBackLinear sharing the parameters of ``module``."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = module.in_features, module.out_features
        layer.weight, layer.bias = module.weight, module.bias
        return layer


def to_switchback(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place, parameters shared) by a SwitchBackLinear, except names
    ending in one of ``skip`` and layers whose weight is tied to the input embedding."""
    tied = tied_to_embeddings(model)
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and is_linear_like(module)) or isinstance(module, SwitchBackLinear):
            continue
        if name.endswith(skip) or id(module.weight) in tied:
            continue
        replace_module(model, name, SwitchBackLinear.from_linear(module))
    return model


class StableEmbedding(nn.Embedding):
    """Embedding followed by a LayerNorm, its weight's optimizer state kept in fp32 by lowbit's 8-bit
    optimizers: the remedy the 8-bit optimizers paper gives for unstable embedding updates."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, **kwargs)
        self.norm = nn.LayerNorm(embedding_dim)
        nn.init.xavier_uniform_(self.weight)
        self.weight.optim_bits = 32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(ids))
