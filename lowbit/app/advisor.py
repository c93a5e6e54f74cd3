"""The precision advisor: from measured sensitivities, the plan of least predicted cost within a size budget.

A budget is either bits per weight averaged over the blocks' linear layers (``bits``: the embeddings keep the
format the user chose) or the bytes of the whole stored model (``budget``: the embeddings are a candidate too, in
float32, bfloat16, int8 or 4-bit rows). The predicted cost of a plan is the sum of its layers' costs (additivity:
checked by the benchmark against measured perplexity); its predicted perplexity is exp(sum) x the full model's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lowbit.analysis.allocate import Choice, allocate
from lowbit.analysis.sensitivity import Sensitivity
from lowbit.plan import Plan

EMBEDDINGS = "embeddings"  # the group name of the embedding table (with a tied head) in an allocation
HEAD = "lm_head"  # the group of an untied LM head (the plan's layer name for it too, as in transformers' models)
UNIFORM = ("int8-weight", "nf4", "rtn4", "gptq4", "gptq3", "spqr3", "rtn3")  # what the frontier plot sets beside
DP_CELLS = 20_000  # budget resolution of the allocation: sizes round up to budget / DP_CELLS bytes


@dataclass
class Advice:
    """A plan and what it was chosen for: its bytes, bits per linear weight and predicted cost."""

    plan: Plan
    choices: dict[str, Choice]
    linear_bytes: int
    model_bytes: int
    bits: float
    cost: float

    def predicted_perplexity(self, reference: float) -> float:
        """The full model's perplexity ``reference`` times exp(predicted cost)."""
        return reference * math.exp(self.cost)


def bounds(sens: Sensitivity, cost: str, embeddings: str | None) -> dict[str, float]:
    """The smallest and the full-precision sizes, in bits per linear weight and in model bytes."""
    groups = _groups(sens, cost, embeddings)
    small = sum(min(c.nbytes for c in g) for g in groups.values())
    full = sum(max(c.nbytes for c in g) for g in groups.values())
    extra = sens.fixed_bytes + (0 if embeddings is None else _kept_bytes(sens, embeddings))
    linear_small = sum(min(c.nbytes for c in g) for n, g in groups.items() if n not in (EMBEDDINGS, HEAD))
    return {"min_bits": 8 * linear_small / sens.linear_params, "max_bits": 32.0,
            "min_bytes": small + extra, "max_bytes": full + extra}


def _kept_bytes(sens: Sensitivity, embeddings: str) -> int:
    """Bytes of the embeddings in the user's format and of an untied head kept float32 (a bits budget)."""
    return sens.embeddings[embeddings]["bytes"] + sens.head.get("float32", {}).get("bytes", 0)


def _groups(sens: Sensitivity, cost: str, embeddings: str | None) -> dict[str, list[Choice]]:
    if cost not in ("kl", "fisher", "output"):
        raise ValueError(f"cost must be kl, fisher or output, got {cost!r}")
    groups = {}
    for layer, formats in sens.layers.items():
        if any(cost not in e for e in formats.values()):
            raise ValueError(f"the sensitivity holds no {cost} costs (measure it with kl=True)")
        groups[layer] = [Choice(f, e["bytes"], e[cost]) for f, e in formats.items()]
    if embeddings is None:  # a candidate: the embeddings' KL, the same quantity the layers' costs estimate
        groups[EMBEDDINGS] = [Choice(f, e["bytes"], e["kl"]) for f, e in sens.embeddings.items()]
        if sens.head:
            groups[HEAD] = [Choice(f, e["bytes"], e["kl"]) for f, e in sens.head.items()]
    return groups


def advise(sens: Sensitivity, bits: float | None = None, budget: int | None = None, cost: str = "fisher",
           embeddings: str = "float32") -> Advice:
    """The plan of least predicted cost within ``bits`` per linear weight or ``budget`` model bytes (one of them)."""
    if (bits is None) == (budget is None):
        raise ValueError("give one budget: bits per linear weight, or the model's bytes")
    free = None if budget is not None else embeddings  # a bytes budget chooses the embeddings' format too
    groups = _groups(sens, cost, free)
    b = bounds(sens, cost, free)
    if bits is not None:
        if not b["min_bits"] <= bits < b["max_bits"]:
            raise ValueError(f"{bits} bits per weight is outside what the formats reach: from {b['min_bits']:.2f} "
                             f"(every layer in its smallest format) to below {b['max_bits']:.0f} (full precision)")
        room = int(bits * sens.linear_params / 8)
    else:
        if not b["min_bytes"] <= budget < b["max_bytes"]:
            raise ValueError(f"a budget of {budget / 1e6:.1f} MB is outside what the formats reach: from "
                             f"{b['min_bytes'] / 1e6:.1f} MB (the smallest plan) to below {b['max_bytes'] / 1e6:.1f} MB "
                             "(the full-precision model)")
        room = budget - sens.fixed_bytes
    choices = allocate(groups, room, unit=_unit(groups, room))
    emb = choices.pop(EMBEDDINGS).format if EMBEDDINGS in choices else embeddings
    head = choices.pop(HEAD, None)
    linear_bytes = sum(c.nbytes for c in choices.values())
    outside = sens.embeddings[emb]["bytes"] + (head.nbytes if head else sens.head.get("float32", {}).get("bytes", 0))
    total_cost = sum(c.cost for c in choices.values()) + sens.embeddings[emb]["kl"] + (head.cost if head else 0.0)
    layers = {n: c.format for n, c in choices.items()}
    if head is not None and head.format != "float32":
        layers[HEAD] = head.format
    plan = Plan(layers=layers, embeddings=emb,
                notes={"cost": cost, "predicted_cost": total_cost, "bits": 8 * linear_bytes / sens.linear_params,
                       **({"budget_bits": bits} if bits is not None else {"budget_bytes": budget})})
    return Advice(plan, choices, linear_bytes, sens.fixed_bytes + linear_bytes + outside,
                  8 * linear_bytes / sens.linear_params, total_cost)


# GGUF files: each block layer in one of llama.cpp's block types, its codes chosen by GPTQ on that type's grid.
GGUF_FORMATS = ("gptq-q8_0", "gptq-q5_0", "gptq-q4_1", "gptq-q4_0", "gptq-iq4_nl")


def advise_gguf(sens: Sensitivity, bits: float | None = None, budget: int | None = None,
                cost: str = "fisher") -> Advice:
    """The plan of least predicted cost among the GGUF block types (``sens`` measured with GGUF_FORMATS) within
    ``bits`` per linear weight or ``budget`` file bytes. The embeddings stay float32 in the plan: the GGUF export
    writes them in Q8_0, whose cost and bytes the int8 rows' stand for here."""
    only = Sensitivity(layers={n: {f: e for f, e in fs.items() if f in GGUF_FORMATS} for n, fs in sens.layers.items()},
                       embeddings=sens.embeddings, head=sens.head, fixed_bytes=sens.fixed_bytes,
                       linear_params=sens.linear_params, reference=sens.reference, key=sens.key)
    if any(not fs for fs in only.layers.values()):
        raise ValueError("the sensitivities hold no GGUF block types: measure them with GGUF_FORMATS")
    if budget is not None:
        bits = 8 * (budget - sens.fixed_bytes - _kept_bytes(sens, "int8")) / sens.linear_params
    a = advise(only, bits=bits, cost=cost, embeddings="int8")
    plan = Plan(layers=a.plan.layers, notes={**a.plan.notes, "gguf": True,
                                             **({"budget_bytes": budget} if budget is not None else {})})
    return Advice(plan, a.choices, a.linear_bytes, a.model_bytes, a.bits, a.cost)


def _unit(groups: dict[str, list[Choice]], room: int) -> int:
    """The allocation's byte unit: the sizes' greatest common divisor where it resolves the budget in at most
    4 x DP_CELLS cells (exact: a plan of the smallest formats fits a budget of exactly its size), else room /
    DP_CELLS."""
    exact = math.gcd(*(c.nbytes for g in groups.values() for c in g))
    return exact if exact and room // exact <= 4 * DP_CELLS else max(1, room // DP_CELLS)


def uniform(sens: Sensitivity, fmt: str, cost: str = "fisher", embeddings: str = "float32") -> Advice:
    """Every layer in ``fmt``: the plan a uniform method makes, with its predicted cost, for comparison."""
    choices = {n: Choice(fmt, f[fmt]["bytes"], f[fmt][cost]) for n, f in sens.layers.items()}
    linear_bytes = sum(c.nbytes for c in choices.values())
    total = sum(c.cost for c in choices.values()) + sens.embeddings[embeddings]["kl"]
    return Advice(Plan(layers={n: fmt for n in choices}, embeddings=embeddings), choices, linear_bytes,
                  sens.fixed_bytes + linear_bytes + _kept_bytes(sens, embeddings),
                  8 * linear_bytes / sens.linear_params, total)


def frontier(sens: Sensitivity, bits: list[float], cost: str = "fisher", embeddings: str = "float32") -> list[Advice]:
    """The advised plan at each bits-per-weight budget (those the formats can reach)."""
    lo = bounds(sens, cost, embeddings)["min_bits"]
    return [advise(sens, bits=b, cost=cost, embeddings=embeddings) for b in bits if b >= lo]


def format_counts(advice: Advice) -> dict[str, int]:
    """How many layers each format got."""
    counts: dict[str, int] = {}
    for c in advice.choices.values():
        counts[c.format] = counts.get(c.format, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
