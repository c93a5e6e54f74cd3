"""GPTQ onto llama.cpp's block types: each weight's code chosen on the type's own grid (blocks of 32, the scale
and min the type stores), rounding errors spread over the columns not yet quantized as GPTQ does, so that a GGUF
file carries calibrated weights llama.cpp runs as they are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowbit.calibrate.gptq import gptq_sweep, inverse_hessian
from lowbit.config import check_calibration_fields
from lowbit.nn.base import linear_weight
from lowbit.nn.ggml import (BLOCK_TYPES, K_FALLBACK, BlockConfig, BlockLinear, block_format, check_rows,
                             rows_type)
from lowbit.registry import Format, Method, register


@dataclass
class GPTQBlockConfig(BlockConfig):
    """GPTQ onto a llama.cpp block type; the calibration fields mean what GPTQConfig's do."""

    method: ClassVar[str] = "gptq-ggml"  # its name in JSON

    act_order: bool = True
    damp: float = 0.01
    n_samples: int = 32
    seq_len: int = 512
    token_clip: float | None = 3.0
    true_sequential: bool = False

    def check(self) -> None:
        super().check()
        check_calibration_fields(self)


def gptq_blocks(W: torch.Tensor, H: torch.Tensor, t, act_order: bool = True, damp: float = 0.01, block: int = 128):
    """GPTQ of a float [out, in] weight onto block type ``t`` (a ggml.BlockType or kquants.KType); its blocks.

    Each block's scale (and min) is fixed before the sweep from the unquantized weight, searched for the least
    error weighted by the Hessian's diagonal (the inputs' mean square: what llama.cpp's importance matrix holds).
    Fixed scales let act-order visit columns in any order; the sweep then picks each code as the nearest grid
    point to the error-compensated weight."""
    W = W.float().clone()
    dead = torch.diag(H) == 0
    W[:, dead] = 0  # inputs that never fire: nothing to compensate with
    fmt = block_format(t.name)[0]
    fixed = fmt.search(t, W, torch.diag(H).clamp(min=0))
    d, m = fixed.per_weight()
    codes = torch.zeros_like(fixed.codes)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    hinv, _ = inverse_hessian(H[perm][:, perm], damp)

    def quant(j: int, w: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        col = int(perm[j])
        mc = None if m is None else m[:, col]
        q = fmt.nearest(t, w, d[:, col], mc)
        codes[:, col] = q.to(torch.uint8)
        return fmt.grid_value(t, q, d[:, col], mc)

    gptq_sweep(W[:, perm], hinv, quant, block)
    fixed.codes = codes
    return fixed


def gptq_block_layer(module: nn.Module, H: torch.Tensor, config: GPTQBlockConfig) -> BlockLinear:
    """The BlockLinear that GPTQ makes of one linear layer from the Hessian ``H`` of its inputs."""
    w = linear_weight(module)
    t = check_rows(rows_type(config.block_type, w.shape[1]), w.shape[1])
    blocks = gptq_blocks(w, H, t, config.act_order, config.damp)
    return BlockLinear.from_blocks(blocks, module.bias, config.compute_dtype)


register(Format(GPTQBlockConfig, BlockLinear, gptq_block_layer, calibrated=True,
                methods={f"gptq-{name}": Method({"block_type": name}, f"GPTQ onto llama.cpp's {name.upper()} "
                                                f"({block_format(name)[1].bits_per_weight:g} bits/weight): calibrated "
                                                "codes a GGUF holds" + (f" (rows not a multiple of 256: "
                                                                        f"{K_FALLBACK[name].upper()})"
                                                                        if name in K_FALLBACK else ""))
                         for name in BLOCK_TYPES}))
