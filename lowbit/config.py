"""Quantization configs: small dataclasses that say how to quantize a model, and round-trip JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit import registry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_DTYPES = tuple(DTYPES.values())
DEFAULT_SKIP = ("lm_head", "*.lm_head")


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _number(value, name: str, low: float, high: float = float("inf"), open_low: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value
    if not ok or value > high or value < low or (open_low and value == low):
        bound = f"{'>' if open_low else '>='} {low}" + ("" if high == float("inf") else f" and <= {high}")
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def _choice(value, name: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_compute_dtype(dtype) -> None:
    """Raise ValueError unless ``dtype`` is one lowbit layers compute in (and checkpoints store)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")


@dataclass
class BaseConfig:
    """What every quantization config shares: the layers it applies to. Each subclass is one format's config,
    registered with its layer in lowbit/registry.py; ``method`` names the class in its JSON."""

    quant_method: ClassVar[str] = "lowbit"  # what transformers' from_pretrained(quantization_config=...) dispatches on
    method: ClassVar[str] = ""
    skip: tuple[str, ...] = DEFAULT_SKIP  # fnmatch patterns of module names left as they are
    modules: tuple[str, ...] | None = None  # fnmatch patterns of modules to quantize; None: every linear layer

    def __post_init__(self) -> None:
        # Every field is checked here, when the config is made: not minutes later, inside quantize.
        for key in ("skip", "modules"):
            v = getattr(self, key)
            if v is None and key == "modules":
                continue
            if isinstance(v, str) or not all(isinstance(p, str) for p in v):
                raise ValueError(f"{key} must be a list of module-name patterns (strings), got {v!r}")
            setattr(self, key, tuple(v))
        if hasattr(self, "compute_dtype"):
            check_compute_dtype(self.compute_dtype)
        self.check()

    def check(self) -> None:
        """Raise ValueError on a field out of its range (each config checks its own)."""

    def to_dict(self) -> dict:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else (list(v) if isinstance(v, tuple) else v)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


INT8_ACTIVATIONS = ("zeropoint", "absmax")


def int8_activations(activations: str | None, weight_only: bool) -> str | None:
    """``activations`` as given, or its default: zero-point, or absmax (unused) for weight-only int8."""
    if activations is not None:
        return activations
    return "absmax" if weight_only else "zeropoint"


@dataclass
class Int8Config(BaseConfig):
    """LLM.int8(): int8 weights and activations, outlier columns (|x| >= threshold) in float."""

    method: ClassVar[str] = "int8"  # its name in JSON

    threshold: float = 6.0
    weight_only: bool = False
    compute_dtype: torch.dtype = torch.float32
    # "zeropoint": LLM.int8()'s asymmetric vector-wise activations (finer steps, same speed); "absmax": as
    # bitsandbytes quantizes them. None: zeropoint, or absmax (unused) under weight_only.
    activations: str | None = None

    def check(self) -> None:
        _number(self.threshold, "threshold", 0.0)  # 0 (or inf) turns the outlier split off
        _choice(self.weight_only, "weight_only", (True, False))
        self.activations = int8_activations(self.activations, self.weight_only)
        _choice(self.activations, "activations", INT8_ACTIVATIONS)
        if self.weight_only and self.activations != "absmax":
            raise ValueError("activations applies to int8 activations: weight_only=True keeps them in float")


@dataclass
class NF4Config(BaseConfig):
    """QLoRA's NF4 (or FP4 / uniform int4) blockwise weights, optional double quantization."""

    method: ClassVar[str] = "4bit"  # its name in JSON

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool | None = None  # None: on for nf4 / fp4 (their absmax), off for int4 (it has no absmax)
    compute_dtype: torch.dtype = torch.float32

    def check(self) -> None:
        _choice(self.quant_type, "quant_type", ("nf4", "fp4", "int4"))
        _positive_int(self.blocksize, "blocksize")
        if self.blocksize % 2:
            raise ValueError(f"blocksize must be even (two 4-bit codes share a byte), got {self.blocksize}")
        if self.double_quant is None:
            self.double_quant = self.quant_type != "int4"
        _choice(self.double_quant, "double_quant", (True, False))
        if self.double_quant and self.quant_type == "int4":
            raise ValueError("double_quant applies to the absmax of nf4 / fp4; int4 has a scale and zero per group")


@dataclass
class TernaryConfig(BaseConfig):
    """BitNet b1.58: ternary absmean weights, per-token int8 activations (post-training here)."""

    method: ClassVar[str] = "ternary"  # its name in JSON

    compute_dtype: torch.dtype = torch.float32


@dataclass
class IntConfig(BaseConfig):
    """Round-to-nearest uniform intN (2, 3, 4, 8 bits) with an fp16 scale and integer zero per group."""

    method: ClassVar[str] = "int"  # its name in JSON

    bits: int = 4
    group_size: int = 128
    compute_dtype: torch.dtype = torch.float32
    clip_search: bool = False  # search each group's range for the least rounding error instead of min-max

    def check(self) -> None:
        _choice(self.bits, "bits", (2, 3, 4, 8))
        _positive_int(self.group_size, "group_size")
        _choice(self.clip_search, "clip_search", (True, False))


@dataclass
class GPTQConfig(IntConfig):
    """GPTQ: the IntConfig format, rounding errors compensated with the Hessian of calibration inputs."""

    method: ClassVar[str] = "gptq"  # its name in JSON

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

    def check(self) -> None:
        super().check()
        check_calibration_fields(self)


def check_calibration_fields(c) -> None:
    _number(c.damp, "damp", 0.0, open_low=True)
    _positive_int(c.n_samples, "n_samples")
    _positive_int(c.seq_len, "seq_len")
    if c.token_clip is not None:
        _number(c.token_clip, "token_clip", 1.0)
    _choice(c.true_sequential, "true_sequential", (True, False))


@dataclass
class SpQRConfig(BaseConfig):
    """SpQR: GPTQ on tiny groups with 3-bit statistics, sensitive weights kept as sparse fp16 outliers."""

    method: ClassVar[str] = "spqr"  # its name in JSON

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

    def check(self) -> None:
        _choice(self.bits, "bits", (2, 3, 4, 8))
        _positive_int(self.group_size, "group_size")
        _positive_int(self.stat_group, "stat_group")
        _number(self.outlier_threshold, "outlier_threshold", 0.0, open_low=True)
        _number(self.max_outliers, "max_outliers", 0.0, 1.0)
        check_calibration_fields(self)


# Any lowbit quantization config: a BaseConfig subclass that a format registers (lowbit/registry.py).
QuantConfig = BaseConfig


def format_name(config: QuantConfig) -> str:
    """A short name of a config's weight format, one ``config_from_name`` reads back where it can ("gptq3-g64"):
    the registered method name that sets the most of its fields, with the bits and group size as suffixes where the
    format takes them, and a block size other than the default as "-b<size>"."""
    fmt = registry.format_of(config)
    d = config.to_dict()
    matching = [(len(m.fields), -i, name) for i, (name, m) in enumerate(fmt.methods.items())
                if all(d.get(k) == v for k, v in m.fields.items())]
    name = max(matching)[2]
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    if fmt.suffixes:
        return f"{name}{d['bits']}" + ("" if d["group_size"] == defaults["group_size"] else f"-g{d['group_size']}")
    if "blocksize" in d and d["blocksize"] != defaults["blocksize"]:
        return f"{name}-b{d['blocksize']}"
    return name


def config_from_name(name: str, **overrides) -> QuantConfig:
    """The config of a method by name, as the ``lowbit`` command names them (nf4, int8, gptq3, ...); ``overrides``
    set fields (``config_from_name("nf4", blocksize=128)``)."""
    found = registry.lookup(name)
    if found is None:
        suffixed = " and ".join(registry.suffixed_names())
        raise ValueError(f"unknown quantization method {name!r}; choose from {', '.join(registry.method_names())} "
                         f"({suffixed} take their bits and group size as suffixes: gptq3, rtn4-g64)")
    fmt, fields, _ = found
    return _build(name, fmt.config, fields, overrides)


def _build(name: str, cls, fields: dict, overrides: dict) -> QuantConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        verb = "does" if len(unknown) == 1 else "do"
        raise ValueError(f"{', '.join(unknown)} {verb} not apply to {name} ({cls.__name__} has {', '.join(sorted(known))})")
    return cls(**{**fields, **overrides})


def config_from_dict(d: dict) -> QuantConfig:
    """Rebuild a config from ``to_dict`` output (or a ``config_from_name`` name as its method: "nf4");
    unknown methods or fields raise ValueError. A saved Plan is ``lowbit.plan.quantization_from_dict``'s."""
    d = dict(d)
    method = d.pop("method", None)
    classes = {f.config.method: f.config for f in registry.formats()}
    if method not in classes and (found := registry.lookup(method)) is not None:
        method, named = found[0].config.method, found[1]
        clash = {k for k in named if k in d and d[k] != named[k]}
        if clash:
            raise ValueError(f"method and field(s) {sorted(clash)} disagree: {d}")
        d = {**named, **d}
    if method not in classes:
        raise ValueError(f"unknown quantization method {method!r}; known: {', '.join(classes)} (or "
                         f"{', '.join(registry.method_names())})")
    cls = classes[method]
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(d) - names
    if extra:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(extra)}")
    if "compute_dtype" in d:
        if d["compute_dtype"] not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {list(DTYPES)}, got {d['compute_dtype']!r}")
        d["compute_dtype"] = DTYPES[d["compute_dtype"]]
    for key in ("skip", "modules"):
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
    return cls(**d)


def config_from_json(text: str) -> QuantConfig:
    """Rebuild a config from ``to_json`` output."""
    return config_from_dict(json.loads(text))
