"""Quantization plans: one format per layer (a mixed-format model), as JSON that ``lowbit.quantize`` applies.

    {"format": "lowbit-plan", "layers": {"model.layers.0.mlp.down_proj": "int8-weight", ...},
     "default": "gptq4", "embeddings": "int8"}

A layer's format is a method name as ``lowbit.config.config_from_name`` reads it (nf4, int8-weight, rtn3-g64,
gptq4, spqr3, ...), a config dict (``QuantConfig.to_dict``), "bfloat16", or "float32" (kept as it is).
``default`` is the format of every layer the plan does not name; without one, a plan must name them all. The LM
head is quantized only where named (as uniform methods leave it); a head tied to the embeddings follows
``embeddings`` (float32, bfloat16, int8 or int4 rows).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lowbit.config import QuantConfig, config_from_dict, config_from_name
from lowbit.embeddings import embedding_pair
from lowbit.jsonfile import JSONFileError, read_json
from lowbit.nn.base import is_linear_like
from lowbit.nn.embedding import EMBEDDING_FORMATS
from lowbit.registry import is_calibrated

PLAN_FORMAT = "lowbit-plan"
KEEP, HALF = "float32", "bfloat16"


@dataclass
class Plan:
    """Per-layer formats (layer name -> format), the format of layers left out, and the embeddings' format."""

    layers: dict[str, str | dict] = field(default_factory=dict)
    default: str | dict | None = None
    embeddings: str = KEEP
    notes: dict = field(default_factory=dict)  # what made the plan (budget, predicted cost): kept, not applied

    def __post_init__(self) -> None:
        if not isinstance(self.layers, dict) or not all(isinstance(k, str) for k in self.layers):
            raise ValueError(f"plan layers must map layer names to formats, got {type(self.layers).__name__}")
        for name, fmt in self.layers.items():
            parse_format(fmt, f"layer {name}")
        if self.default is not None:
            parse_format(self.default, "default")
        if self.embeddings not in EMBEDDING_FORMATS:
            raise ValueError(f"plan embeddings must be one of {', '.join(EMBEDDING_FORMATS)}, got {self.embeddings!r}")

    def needs_calibration(self) -> bool:
        """Whether any format of the plan is GPTQ or SpQR (calibration data needed)."""
        formats = list(self.layers.values()) + ([self.default] if self.default is not None else [])
        return any(is_calibrated(parse_format(f)) for f in formats)

    def to_dict(self) -> dict:
        return {"method": "plan", "format": PLAN_FORMAT, "layers": dict(self.layers), "default": self.default,
                "embeddings": self.embeddings, "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        # Plans written by hand may leave "format" out; one that gives it must give this one.
        if not isinstance(d, dict) or d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise ValueError(f"not a lowbit plan (a JSON object of \"layers\" and/or \"default\"; its \"format\", "
                             f"if given, must be \"{PLAN_FORMAT}\")")
        d = {k: v for k, v in d.items() if k not in ("method", "format")}
        unknown = sorted(set(d) - {"layers", "default", "embeddings", "notes"})
        if unknown:
            raise ValueError(f"a plan has no field(s) {unknown}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """The plan in a JSON file; ValueError (one line) for a file that is not one."""
        try:
            d = read_json(path)
        except (OSError, JSONFileError) as e:
            raise ValueError(f"cannot read the plan: {e}") from None  # each names the file
        return cls.from_dict(d)


def parse_format(fmt, where: str = "format") -> QuantConfig | str:
    """A plan entry as a config, or KEEP / HALF; ValueError naming ``where`` for anything else."""
    if fmt in (KEEP, HALF):
        return fmt
    try:
        if isinstance(fmt, dict):
            return config_from_dict(fmt)
        if isinstance(fmt, str):
            return config_from_name(fmt)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: a format is a name (nf4, gptq3, rtn4-g64, float32, ...) or a config object, got {fmt!r}")


def plan_targets(model: nn.Module, plan: Plan) -> dict[str, QuantConfig | str]:
    """Each linear layer the plan sets, with its parsed format; ValueError for names the model lacks, layers left out
    without a default, or a head tied to the embeddings named as a layer."""
    emb, head, tied = embedding_pair(model) if hasattr(model, "get_input_embeddings") else (None, None, False)
    head_names = {n for n, m in model.named_modules() if head is not None and m is head}
    linears = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    missing = [n for n in plan.layers if n not in linears]
    if missing:
        raise ValueError(f"the plan names {len(missing)} layer(s) this model lacks, e.g. {missing[0]!r}")
    if tied and head_names & set(plan.layers):
        raise ValueError(f"{sorted(head_names)[0]} is tied to the embeddings: set its format with the plan's "
                         "\"embeddings\", not as a layer")
    required = [n for n in linears if n not in head_names]
    left = [n for n in required if n not in plan.layers]
    if left and plan.default is None:
        raise ValueError(f"the plan leaves out {len(left)} layer(s), e.g. {left[0]!r}: name them or give a \"default\" "
                         "(\"float32\" keeps them)")
    out = {}
    for n in linears:
        fmt = plan.layers.get(n, plan.default if n in required else None)
        if fmt is not None:
            out[n] = parse_format(fmt, f"layer {n}")
    return out


def quantization_from_dict(d: dict) -> "QuantConfig | Plan":
    """A saved quantization (``to_dict`` of a config or of a Plan) rebuilt; ValueError for anything else."""
    if isinstance(d, dict) and d.get("method") == "plan":
        return Plan.from_dict(d)
    return config_from_dict(d)


__all__ = ["Plan", "parse_format", "plan_targets", "quantization_from_dict", "KEEP", "HALF"]
