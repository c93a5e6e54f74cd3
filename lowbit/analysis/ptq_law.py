"""The post-training-quantization degradation law of Kumar et al. ("Scaling laws for precision", 2024), fitted to
measured points:

    delta = C * D^a / N^b * exp(-P / g)        (D training tokens, N parameters, P bits after training)

where delta is the loss added by quantizing (nats). It is linear in ln delta = ln C + a ln D - b ln N - P / g, so
it is fitted by least squares on the points with delta > 0 (a quantizer that happens to score better than the model
says nothing about the trend; a non-finite one is left out too), with bootstrap intervals and the residuals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Point:
    """One quantized model: its training tokens, parameters, bits and added loss."""

    tokens: float
    params: float
    bits: float
    delta: float


def fit_ptq_law(points: list[Point], resamples: int = 1000, seed: int = 0) -> dict:
    """The constants (ln C, a, b, 1/g, and g) with 95% bootstrap intervals over the points (a resample that cannot
    identify every constant is skipped), the residuals of ln delta and their rms. With one model size b is not
    identified and is left out; too few points is a ValueError naming how many are needed."""
    kept = [p for p in points if math.isfinite(p.delta) and p.delta > 0]
    t = torch.tensor([(p.tokens, p.params, p.bits, p.delta) for p in kept], dtype=torch.float64).reshape(-1, 4)
    names = ["lnC", "a", "b", "inv_g"]
    columns = [torch.ones(len(t), dtype=torch.float64), t[:, 0].log(), -t[:, 1].log(), -t[:, 2]]
    if len(set(t[:, 1].tolist())) < 2:
        del names[2], columns[2]
    if len(kept) < len(names) + 2:
        raise ValueError(f"{len(kept)} points with delta > 0: fitting {len(names)} constants needs at least "
                         f"{len(names) + 2}")
    X, y = torch.stack(columns, 1), t[:, 3].log()
    if torch.linalg.matrix_rank(X) < len(names):
        raise ValueError("the points do not vary enough to identify the constants (tokens and bits must vary, and "
                         "tokens must not be proportional to parameters)")

    def solve(idx: torch.Tensor) -> torch.Tensor:
        return torch.linalg.lstsq(X[idx], y[idx].unsqueeze(1)).solution.flatten()

    coef = solve(torch.arange(len(t)))
    g = torch.Generator().manual_seed(seed)
    boot = []
    for _ in range(resamples):
        idx = torch.randint(0, len(t), (len(t),), generator=g)
        if torch.linalg.matrix_rank(X[idx]) == len(names):
            boot.append(solve(idx))
    if len(boot) < 2:
        raise ValueError(f"only {len(boot)} of {resamples} bootstrap resamples identify the constants: too few points")
    boot = torch.stack(boot)
    lo, hi = boot.quantile(0.025, 0), boot.quantile(0.975, 0)
    residuals = (y - X @ coef).tolist()
    inv_g = float(coef[names.index("inv_g")])
    return {"points": len(kept), "excluded": len(points) - len(kept), "resamples": len(boot),
            **{n: float(coef[i]) for i, n in enumerate(names)},
            "ci95": {n: [float(lo[i]), float(hi[i])] for i, n in enumerate(names)},
            "g": 1 / inv_g if inv_g != 0 else math.inf,
            "residuals": [{"tokens": p.tokens, "params": p.params, "bits": p.bits, "residual": e}
                          for p, e in zip(kept, residuals)],
            "rms_residual": float(torch.tensor(residuals).pow(2).mean().sqrt())}
