"""The format registry: every quantized weight format lowbit knows, one entry each, registered next to its layer.

An entry names its config class, the layer it builds and how, and the method names that choose it (each with the
config fields it sets and a line of help). ``quantize``, plans, the streamed writer, calibration, checkpoints and
the command line all read this table, so a new format is one module that defines its layer and calls ``register``
(tests/test_registry.py adds one). Layers that no method builds but checkpoints hold (bf16 weights, quantized
embeddings) are registered with ``register_layer``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Method:
    """A name that chooses a format: the config fields it sets, one line for help and tables, and the command's
    options it takes with the config field each sets."""

    fields: dict
    help: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Format:
    """One weight format. ``build(module, config)`` makes its layer from an nn.Linear / Conv1D; a ``calibrated``
    format's ``build(module, hessian, config)`` takes the Hessian of the layer's inputs too (GPTQ, SpQR). With
    ``suffixes`` its method names also take the bits and group size: gptq3, rtn4-g64."""

    config: type
    layer: type
    build: Callable[..., nn.Module]
    methods: dict[str, Method]
    calibrated: bool = False
    suffixes: bool = False


_FORMATS: dict[type, Format] = {}  # config class -> its format
_METHODS: dict[str, Format] = {}  # method name -> the format it chooses
_LAYERS: dict[str, type] = {}  # layer class name -> class: what checkpoints may name
_LAYER_VIEW = MappingProxyType(_LAYERS)
_SUFFIXED = re.compile(r"^(?P<base>[a-z0-9]+?)(?P<bits>[2348])?(?:-g(?P<group>[1-9][0-9]*))?$")


def register(fmt: Format) -> Format:
    """Add ``fmt`` to the registry (ValueError if its config class or one of its names is taken); returns it."""
    taken = sorted(n for n in fmt.methods if n in _METHODS and _METHODS[n] is not fmt)
    if fmt.config in _FORMATS and _FORMATS[fmt.config] != fmt or taken:
        raise ValueError(f"format already registered: {fmt.config.__name__} {taken or ''}")
    _FORMATS[fmt.config] = fmt
    _METHODS.update(dict.fromkeys(fmt.methods, fmt))
    register_layer(fmt.layer)
    return fmt


def register_layer(cls: type) -> type:
    """Let checkpoints name the layer class ``cls`` (by its class name); returns it, so it serves as a decorator."""
    _LAYERS[cls.__name__] = cls
    return cls


def formats() -> list[Format]:
    """Every registered format, in registration order."""
    return list(_FORMATS.values())


def layer_types() -> Mapping[str, type]:
    """Every layer class a checkpoint may name, by class name: a live, read-only view (formats registered later
    appear in it)."""
    return _LAYER_VIEW


def format_of(config) -> Format:
    """The format of a config object (its exact class); TypeError for anything else."""
    fmt = _FORMATS.get(type(config))
    if fmt is None:
        raise TypeError(f"config must be a lowbit config ({', '.join(c.__name__ for c in _FORMATS)}) or a method "
                        f"name such as 'nf4', got {type(config).__name__}")
    return fmt


def is_calibrated(config) -> bool:
    """Whether ``config`` is a format built from calibration data (GPTQ, SpQR)."""
    fmt = _FORMATS.get(type(config))
    return fmt is not None and fmt.calibrated


def method_names() -> list[str]:
    """Every method name, in registration order (names that take suffixes once, bare)."""
    return list(_METHODS)


def lookup(name: str) -> tuple[Format, dict, Method] | None:
    """(format, config fields, method) a method name chooses, suffixes read (gptq3-g64: bits 3, group_size 64);
    None for a name no format has."""
    if not isinstance(name, str):
        return None
    if name in _METHODS:
        fmt = _METHODS[name]
        return fmt, dict(fmt.methods[name].fields), fmt.methods[name]
    m = _SUFFIXED.match(name)
    fmt = _METHODS.get(m.group("base")) if m else None
    if fmt is None or not fmt.suffixes or not (m.group("bits") or m.group("group")):
        return None
    method = fmt.methods[m.group("base")]
    fields = dict(method.fields)
    if m.group("bits"):
        fields["bits"] = int(m.group("bits"))
    if m.group("group"):
        fields["group_size"] = int(m.group("group"))
    return fmt, fields, method


def suffixed_names() -> list[str]:
    """The method names that take bits and group suffixes (rtn, gptq, spqr)."""
    return [n for n, f in _METHODS.items() if f.suffixes]


__all__ = ["Format", "Method", "format_of", "formats", "is_calibrated", "layer_types", "lookup", "method_names",
           "register", "register_layer", "suffixed_names"]
