"""Quantization configs: small dataclasses that say how to quantize a model, and round-trip JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SKIP = ("lm_head", "*.lm_head")


@dataclass
class _Config:
    skip: tuple[str, ...] = DEFAULT_SKIP  # fnmatch patterns of module names left as they are
    modules: tuple[str, ...] | None = None  # fnmatch patterns of modules to quantize; None: every linear layer

    def to_dict(self) -> dict:
        d = {"method": METHOD_OF[type(self)]}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else (list(v) if isinstance(v, tuple) else v)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass
class Int8Config(_Config):
    """LLM.int8(): int8 weights and activations, outlier columns (|x| >= threshold) in float."""

    threshold: float = 6.0
    weight_only: bool = False
    compute_dtype: torch.dtype = torch.float32
    activations: str = "absmax"  # or "zeropoint": LLM.int8()'s asymmetric vector-wise variant


@dataclass
class NF4Config(_Config):
    """QLoRA's NF4 (or FP4 / uniform int4) blockwise weights, optional double quantization."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32


@dataclass
class TernaryConfig(_Config):
    """BitNet b1.58: ternary absmean weights, per-token int8 activations (post-training here)."""

    compute_dtype: torch.dtype = torch.float32


@dataclass
class IntConfig(_Config):
    """Round-to-nearest uniform intN (2, 3, 4, 8 bits) with an fp16 scale and integer zero per group."""

    bits: int = 4
    group_size: int = 128
    compute_dtype: torch.dtype = torch.float32
    clip_search: bool = False  # search each group's range for the least rounding error instead of min-max


@dataclass
class GPTQConfig(IntConfig):
    """GPTQ: the IntConfig format, rounding errors compensated with the Hessian of calibration inputs."""

    act_order: bool = True
    damp: float = 0.01
    n_samples: int = 32  # calibration sequences
    seq_len: int = 512
    # Each token's weight in the Hessian is capped at token_clip x the median token's: the first token's massive
    # activations (squared norm up to 2.6e5 x the median in SmolLM2's down_proj inputs) would make GPTQ fit that
    # token and the calibration text (docs/calibration.md). None: plain GPTQ.
    token_clip: float | None = 3.0
    # Each group of layers reading one input (q/k/v, o, gate/up, down) is calibrated on the outputs of the groups
    # before it in its block already quantized, as the GPTQ reference code's --true-sequential. Off by default:
    # on SmolLM2-135M it did not help (GPTQ 4-bit g128 1.1697 / 1.4108 vs 1.1623 / 1.3895, docs/calibration.md).
    true_sequential: bool = False


@dataclass
class SpQRConfig(_Config):
    """SpQR: GPTQ on tiny groups with 3-bit statistics, sensitive weights kept as sparse fp16 outliers."""

    bits: int = 3
    group_size: int = 16
    stat_group: int = 16  # rows sharing the second-level statistics of the 3-bit scales and zeros
    outlier_threshold: float = 10.0  # outlier: GPTQ rounding loss > threshold x the group's mean
    max_outliers: float = 0.01  # at most this share of each group's weights
    damp: float = 0.01
    n_samples: int = 32
    seq_len: int = 512
    token_clip: float | None = 3.0  # as in GPTQConfig
    true_sequential: bool = False  # as in GPTQConfig
    compute_dtype: torch.dtype = torch.float32


METHOD_OF = {Int8Config: "int8", NF4Config: "4bit", TernaryConfig: "ternary", IntConfig: "int", GPTQConfig: "gptq",
             SpQRConfig: "spqr"}
CALIBRATED = (GPTQConfig, SpQRConfig)
_CLASS_OF = {v: k for k, v in METHOD_OF.items()}

QuantConfig = Int8Config | NF4Config | TernaryConfig | IntConfig | GPTQConfig | SpQRConfig


def config_from_dict(d: dict) -> QuantConfig:
    """Rebuild a config from ``to_dict`` output; unknown methods or fields raise ValueError."""
    d = dict(d)
    method = d.pop("method", None)
    if method not in _CLASS_OF:
        raise ValueError(f"unknown quantization method {method!r}; known: {', '.join(_CLASS_OF)}")
    cls = _CLASS_OF[method]
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(d) - names
    if extra:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(extra)}")
    if "compute_dtype" in d:
        if d["compute_dtype"] not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {list(_DTYPES)}, got {d['compute_dtype']!r}")
        d["compute_dtype"] = _DTYPES[d["compute_dtype"]]
    for key in ("skip", "modules"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return cls(**d)


def config_from_json(text: str) -> QuantConfig:
    """Rebuild a config from ``to_json`` output."""
    return config_from_dict(json.loads(text))
