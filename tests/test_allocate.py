"""The per-layer format allocator (issue 19 item 2): exact against brute force on small cases."""
from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.analysis.allocate import Choice, allocate

choices = st.lists(st.builds(Choice, st.sampled_from(["int8", "nf4", "int3", "bf16"]), st.integers(0, 40),
                             st.floats(0, 10, allow_nan=False)), min_size=1, max_size=4)


def brute(layers, budget, unit=1):
    best = math.inf
    for combo in itertools.product(*layers.values()):
        if sum(-(-c.nbytes // unit) for c in combo) <= budget // unit:
            best = min(best, sum(c.cost for c in combo))
    return best


@settings(max_examples=300, deadline=None)
@given(st.lists(choices, min_size=1, max_size=5), st.integers(0, 150), st.integers(1, 7))
def test_allocation_is_the_brute_force_optimum(options, budget, unit):
    layers = {f"layer{i}": o for i, o in enumerate(options)}
    optimum = brute(layers, budget, unit)
    if math.isinf(optimum):
        with pytest.raises(ValueError):
            allocate(layers, budget, unit)
        return
    plan = allocate(layers, budget, unit)
    assert list(plan) == list(layers) and all(plan[n] in layers[n] for n in layers)
    assert sum(c.nbytes for c in plan.values()) <= budget
    assert sum(c.cost for c in plan.values()) == pytest.approx(optimum, abs=1e-9)
    if unit == 1:  # exact in bytes: no plan of lower cost fits
        assert sum(c.cost for c in plan.values()) == pytest.approx(brute(layers, budget), abs=1e-9)


def test_a_budget_below_the_smallest_plan_says_the_bound():
    layers = {"a": [Choice("nf4", 10, 1.0), Choice("int8", 20, 0.1)], "b": [Choice("nf4", 5, 2.0)]}
    with pytest.raises(ValueError, match=r"below the smallest plan \(15 bytes\)"):
        allocate(layers, 14)
    assert allocate(layers, 25) == {"a": Choice("int8", 20, 0.1), "b": Choice("nf4", 5, 2.0)}
    assert allocate(layers, 24) == {"a": Choice("nf4", 10, 1.0), "b": Choice("nf4", 5, 2.0)}


def test_a_layer_without_candidates_or_with_a_bad_cost_is_refused():
    with pytest.raises(ValueError, match="layer a has no candidate"):
        allocate({"a": []}, 10)
    with pytest.raises(ValueError, match="not finite"):
        allocate({"a": [Choice("nf4", 1, float("nan"))]}, 10)
