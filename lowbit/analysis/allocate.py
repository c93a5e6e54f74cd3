"""Choose one format per layer: the least total predicted cost whose total bytes fit a budget.

This is the multiple-choice knapsack: each layer is a group, each candidate format an item with a size (bytes)
and a cost (the loss increase it is predicted to add), exactly one item per group. ``allocate`` solves it exactly
by dynamic programming over the budget counted in ``unit`` bytes: every size is rounded up to whole units, so a
plan it returns always fits the budget in bytes, and it is the best plan among those whose rounded sizes fit
(with unit=1, the best plan). Time and memory grow as layers x budget / unit x formats.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Choice:
    """One candidate of one layer: a format's name, the bytes the layer takes in it, its predicted cost."""

    format: str
    nbytes: int
    cost: float


def allocate(layers: dict[str, list[Choice]], budget: int, unit: int = 1) -> dict[str, Choice]:
    """The choice per layer of least total cost with total bytes <= ``budget`` (ValueError if none fits)."""
    if not layers:
        return {}
    if unit < 1:
        raise ValueError(f"unit must be >= 1 byte, got {unit}")
    for name, options in layers.items():
        if not options:
            raise ValueError(f"layer {name} has no candidate format")
        bad = [c for c in options if c.nbytes < 0 or not np.isfinite(c.cost)]
        if bad:
            raise ValueError(f"layer {name}: candidate {bad[0]} has negative bytes or a cost that is not finite")
    smallest = sum(min(c.nbytes for c in options) for options in layers.values())
    if smallest > budget:
        raise ValueError(f"the budget ({budget} bytes) is below the smallest plan ({smallest} bytes)")
    cap = budget // unit
    best = np.zeros(cap + 1)  # best[b]: least cost of the layers so far within b units
    picks = []  # per layer, the option chosen at each budget
    for options in layers.values():
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1, dtype=np.int32)
        for i, c in enumerate(options):
            w = -(-c.nbytes // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + c.cost
            better = cand < new
            new[better], pick[better] = cand[better], i
        best = new
        picks.append(pick)
    if not np.isfinite(best[cap]):
        raise ValueError(f"no plan fits {budget} bytes once sizes are rounded up to {unit}-byte units: "
                         "use a smaller unit")
    plan, b = {}, cap
    for (name, options), pick in zip(reversed(list(layers.items())), reversed(picks)):
        c = options[int(pick[b])]
        plan[name] = c
        b -= -(-c.nbytes // unit)
    return dict(reversed(list(plan.items())))
