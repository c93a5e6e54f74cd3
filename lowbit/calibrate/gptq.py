"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit.config import GPTQConfig
from lowbit.functional.grouped import minmax_stats, round_to_grid
from lowbit.nn.base import linear_weight
from lowbit.nn.intn import BITS_AND_GROUP, IntLinear
from lowbit.registry import Format, Method, register

# quant(j, w, rest) -> dequantized column j; ``rest`` is the current W[:, j:block_end] (for group statistics).
ColumnQuantizer = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def inverse_hessian(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, and the mask of dead inputs (never non-zero)."""
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * torch.diag(H).mean())
    # Each step frees its input: at in_features 11008 one float64 copy is 0.97 GB.
    L = torch.linalg.cholesky(H)
    del H
    hinv = torch.cholesky_inverse(L)
    del L
    U = torch.linalg.cholesky(hinv, upper=True)
    del hinv
    return U.float(), dead


def gptq_sweep(W: torch.Tensor, hinv: torch.Tensor, quant: ColumnQuantizer, block: int = 128) -> torch.Tensor:
    """The GPTQ loop on a float [out, in] weight (modified in place); returns the dequantized result."""
    cols = W.shape[1]
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):  # lazy batch updates: the rest of W is touched once per block
        i2 = min(i1 + block, cols)
        W1, H1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = quant(i1 + i, w, W1[:, i:])
            Q[:, i1 + i] = q
            err = (w - q) / H1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)  # compensate within the block
            err1[:, i] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # and, once, everything after it
    return Q


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, act_order: bool = False,
                  damp: float = 0.01, block: int = 128, clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of a float [out, in] weight with grouped scale/zero: returns (codes uint8, scale, zero) per group."""
    out_f, in_f = W.shape
    if block % group_size and group_size % block:
        raise ValueError(f"group_size {group_size} and block {block} must divide one another")
    W = W.float().clone()
    W[:, torch.diag(H) == 0] = 0  # inputs that never fire: nothing to compensate with
    ngroups = -(-in_f // group_size)
    scale = torch.ones(out_f, ngroups)
    zero = torch.zeros(out_f, ngroups)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    perm = torch.arange(in_f)
    if act_order:
        # Columns with the largest Hessian diagonal first; groups keep their natural layout, so their
        # statistics are fixed beforehand from the unquantized weight ("static groups").
        for g in range(ngroups):
            scale[:, g], zero[:, g] = minmax_stats(W[:, g * group_size:(g + 1) * group_size], bits, clip_search)
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    hinv, _ = inverse_hessian(H, damp)

    def quant(j: int, w: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        col = int(perm[j])
        g = col // group_size
        if not act_order and col % group_size == 0:
            scale[:, g], zero[:, g] = minmax_stats(rest[:, :group_size], bits, clip_search)
        c = round_to_grid(w, scale[:, g], zero[:, g], bits)
        codes[:, col] = c.to(torch.uint8)
        return (c - zero[:, g]) * scale[:, g]

    gptq_sweep(W, hinv, quant, block)
    return codes, scale, zero


def gptq_layer(module: nn.Module, H: torch.Tensor, config: GPTQConfig) -> IntLinear:
    """The IntLinear that GPTQ makes of one linear layer from the Hessian ``H`` of its inputs."""
    codes, scale, zero = gptq_quantize(linear_weight(module), H, config.bits, config.group_size, config.act_order,
                                       config.damp, clip_search=config.clip_search)
    return IntLinear.from_codes(codes, scale, zero, module.bias, config.bits, config.group_size, config.compute_dtype)


register(Format(GPTQConfig, IntLinear, gptq_layer, calibrated=True, suffixes=True,
                methods={"gptq": Method({}, "GPTQ: intN groups of 128, errors compensated with calibration data "
                                            "(gptq3, gptq4)", BITS_AND_GROUP)}))
