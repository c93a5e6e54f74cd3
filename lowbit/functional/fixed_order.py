"""Whole-tensor means that do not depend on the thread count: quantized bytes that depend on the weights alone.

torch splits a reduction of more than 32768 elements (its grain size) across its threads and adds the partial
sums, so such a mean can change in its last bit with the thread count (a 2048 x 2048 weight in NF4 with double
quantization: different nested constants at 1 and 2 threads). Below that size torch sums on one thread in one
order whatever the thread count, and its result is kept: it is also what bitsandbytes computes, bit for bit.
Above it, these sum in float64 in numpy's fixed pairwise order and round once to float32.
"""
from __future__ import annotations

import torch

SERIAL_NUMEL = 32768  # torch's internal GRAIN_SIZE: smaller reductions run on the calling thread alone


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of every element of float ``x`` as a float32 scalar tensor, the same at any thread count."""
    x = x.detach().float()
    if x.numel() < SERIAL_NUMEL:
        return x.mean()
    total = x.reshape(-1).double().cpu().numpy().sum()
    return torch.tensor(total / x.numel(), dtype=torch.float32)


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """mean(|x|) as a float32 scalar tensor, the same at any thread count."""
    return mean(x.detach().abs())
