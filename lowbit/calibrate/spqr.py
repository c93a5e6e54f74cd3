"""SpQR (Dettmers et al., 2023): GPTQ with tiny groups whose scale and zero are themselves quantized to
3 bits, and the few weights that GPTQ's error criterion marks as sensitive kept exactly (fp16, sparse)."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.calibrate.gptq import gptq_sweep, inverse_hessian
from lowbit.config import SpQRConfig
from lowbit.functional import fixed_order
from lowbit.functional.grouped import (SpQRWeight, dequantize_stats, grid_values, minmax_stats, quantize_stats,
                                      round_to_grid)
from lowbit.nn.base import linear_weight
from lowbit.nn.intn import BITS_AND_GROUP
from lowbit.nn.spqr import SpQRLinear
from lowbit.registry import Format, Method, register


def spqr_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 3, group_size: int = 16, stat_bits: int = 3,
                  stat_group: int = 16, outlier_threshold: float = 10.0, max_outliers: float = 0.01,
                  damp: float = 0.01, block: int = 128) -> SpQRWeight:
    """SpQR of a float [out, in] weight.

    At the start of each group of ``group_size`` input columns: score every weight by the GPTQ loss of
    rounding it, (w - q(w))^2 / [H^-1]_jj; weights scoring above ``outlier_threshold`` times the group's
    mean score (at most ``max_outliers`` of the group, the highest) become outliers; the group's
    per-row min-max statistics are taken over the others and quantized to ``stat_bits`` bits over
    blocks of ``stat_group`` rows. GPTQ then rounds the group on those statistics, outliers stay exact.
    """
    out_f, in_f = W.shape
    if block % group_size:
        raise ValueError(f"group_size {group_size} must divide the GPTQ block {block}")
    W = W.float().clone()
    hinv, dead = inverse_hessian(H, damp)
    W[:, dead] = 0
    d = torch.diag(hinv)
    groups = -(-in_f // group_size)
    row_blocks = -(-out_f // stat_group)
    res = SpQRWeight(torch.zeros(out_f, in_f, dtype=torch.uint8), torch.zeros(2, out_f, groups, dtype=torch.uint8),
                     torch.ones(2, row_blocks, groups), torch.zeros(2, row_blocks, groups),
                     torch.zeros(out_f, in_f, dtype=torch.bool), torch.zeros(out_f, in_f))
    cur = {}
    budget = int(max_outliers * out_f * group_size)

    def start_group(col: int, G: torch.Tensor) -> None:
        g, width = col // group_size, G.shape[1]
        s, z = minmax_stats(G, bits)
        score = ((G - grid_values(G, s[:, None], z[:, None], bits)) / d[col:col + width]) ** 2
        mask = score > outlier_threshold * fixed_order.mean(score)  # the same outliers at any thread count
        if int(mask.sum()) > budget:  # keep only the most sensitive within the budget
            top = score.flatten().topk(budget).indices if budget else torch.empty(0, dtype=torch.long)
            mask = torch.zeros_like(mask).view(-1).index_fill_(0, top, True).view_as(mask)
        # Statistics over the weights that will be rounded, not over the outliers.
        lo = torch.where(mask, torch.inf, G).amin(1).clamp(max=0)
        hi = torch.where(mask, -torch.inf, G).amax(1).clamp(min=0)
        maxq = 2**bits - 1
        scale = torch.where(hi > lo, (hi - lo) / maxq, torch.ones_like(hi))
        zero = torch.round(-lo / scale)
        deq = []
        for k, stat in enumerate((scale, zero)):
            codes, s2, z2 = quantize_stats(stat, stat_bits, stat_group)
            res.stat_codes[k, :, g], res.stat_scale[k, :, g], res.stat_zero[k, :, g] = codes, s2, z2
            deq.append(dequantize_stats(codes, s2, z2, stat_group))
        cur.update(scale=torch.where(deq[0] > 0, deq[0], torch.full_like(deq[0], 1e-8)), zero=deq[1], mask=mask, start=col)
        res.outliers[:, col:col + width] = mask

    def quant(j: int, w: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        if j % group_size == 0:
            start_group(j, rest[:, :group_size])
        c = round_to_grid(w, cur["scale"], cur["zero"], bits)
        res.codes[:, j] = c.to(torch.uint8)
        q = (c - cur["zero"]) * cur["scale"]
        out = cur["mask"][:, j - cur["start"]]
        exact = w.half().float()
        res.values[:, j] = torch.where(out, exact, 0.0)
        return torch.where(out, exact, q)

    gptq_sweep(W, hinv, quant, block)
    return res


def spqr_layer(module: nn.Module, H: torch.Tensor, config: SpQRConfig) -> SpQRLinear:
    """The SpQRLinear that SpQR makes of one linear layer from the Hessian ``H`` of its inputs."""
    q = spqr_quantize(linear_weight(module), H, config.bits, config.group_size, 3, config.stat_group,
                      config.outlier_threshold, config.max_outliers, config.damp)
    return SpQRLinear.from_spqr(q, module.bias, config.bits, config.group_size, config.stat_group, config.compute_dtype)


register(Format(SpQRConfig, SpQRLinear, spqr_layer, calibrated=True, suffixes=True,
                methods={"spqr": Method({}, "SpQR: intN groups of 16 with 3-bit statistics + sparse fp16 outliers "
                                            "(spqr3, spqr4)", BITS_AND_GROUP)}))
