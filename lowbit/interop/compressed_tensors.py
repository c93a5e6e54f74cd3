"""Write a model as a compressed-tensors folder (the format vLLM serves): int4 / int8 weight-only, groups along the
input dimension, "pack-quantized" layout.

compressed-tensors stores signed codes q in [-2^(b-1), 2^(b-1)) packed densely into int32 words (code i at bit
i * b, each biased by 2^(b-1)), a scale per group and, for asymmetric weights, a signed zero point packed the same
way down the output dimension; w = (q - zero) * scale. lowbit's IntLinear keeps unsigned codes c and an unsigned
zero z with w = (c - z) * scale, so q = c - 2^(b-1) and zero = z - 2^(b-1) hold the same weights. Layers that are
already IntLinear with these bits and group size are written from their own codes (GPTQ, RTN); any other linear
layer is first rounded to the nearest grid point (lowbit's RTN).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.nn import IntLinear, QuantLinear
from lowbit.nn.base import check_plain_linear, is_linear_like

TYPES = ("int4", "int8")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit codes [rows, n] (int8) as int32 words [rows, ceil(n * bits / 32)], code i at bit i * bits,
    each stored as code + 2^(bits - 1)."""
    rows, n = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    words = -(-n * bits // 32)
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    start = torch.arange(n) * bits
    word, shift = start // 32, start % 32
    out.scatter_add_(1, word.expand(rows, -1), u << shift)  # no two codes share a bit, so adding is or-ing
    spill = shift + bits > 32  # a code that runs over a word boundary: its high bits go to the next word
    if spill.any():
        out.scatter_add_(1, (word[spill] + 1).expand(rows, -1), u[:, spill] >> (32 - shift[spill]))
    out = out[:, :words] & 0xFFFFFFFF
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # as int32 bit patterns


def group_size_for(model: nn.Module) -> int:
    """128, or the largest of 64 and 32 that divides the input features of every linear layer (SmolLM2's 576: 64)."""
    widths = {m.in_features if isinstance(m, QuantLinear) else m.weight.shape[-1]
              for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) and not n.endswith("lm_head")}
    return next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 128)


def _as_int_layer(name: str, module: nn.Module, bits: int, group_size: int) -> tuple[IntLinear, bool]:
    """(the layer as IntLinear of these bits and group size, whether it already was one)."""
    if isinstance(module, IntLinear) and module.bits == bits and module.group_size == group_size \
            and module.zero_dtype == "uint8":
        return module, True
    if isinstance(module, QuantLinear):
        stand_in = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            stand_in.weight.copy_(module.dequantize())
            if module.bias is not None:
                stand_in.bias.copy_(module.bias)
        module = stand_in
    return IntLinear.from_linear(module, bits=bits, group_size=group_size), False


def export_compressed_tensors(model: nn.Module, tokenizer, out: str | Path, qtype: str = "int4",
                              group_size: int = 128, skip: tuple[str, ...] = ("lm_head",)) -> dict:
    """Write ``model`` into the new folder ``out`` (config.json with its quantization_config, model.safetensors,
    the tokenizer); returns counts and size."""
    if qtype not in TYPES:
        raise ValueError(f"compressed-tensors export writes {', '.join(TYPES)}, not {qtype!r}")
    bits = int(qtype[3:])
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists: choose a new folder")
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict"):
        raise ValueError("compressed-tensors export needs a transformers model (its config goes into config.json)")
    tensors: dict[str, torch.Tensor] = {}
    report = {"layers": 0, "from_codes": 0}
    quantized = set()
    for name, module in model.named_modules():
        if not (is_linear_like(module) or isinstance(module, QuantLinear)) or name.split(".")[-1] in skip:
            continue
        if not isinstance(module, (nn.Linear, QuantLinear)):
            raise ValueError(f"{name} is a {type(module).__name__}: compressed-tensors targets nn.Linear layers")
        check_plain_linear(module, name)
        if module.in_features % group_size:
            raise ValueError(f"{name}: {module.in_features} input features are not a multiple of the group size "
                             f"{group_size}")
        layer, own = _as_int_layer(name, module, bits, group_size)
        half = 1 << (bits - 1)
        codes = (layer.codes().to(torch.int16) - half).to(torch.int8)
        zero = (layer.weight_zero.to(torch.int16) - half).to(torch.int8)
        tensors[f"{name}.weight_packed"] = pack_int32(codes, bits)
        tensors[f"{name}.weight_scale"] = layer.weight_scale.float()  # fp16 values, exact in fp32
        tensors[f"{name}.weight_zero_point"] = pack_int32(zero.t().contiguous(), bits).t().contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.float()
        quantized.add(name)
        report["layers"] += 1
        report["from_codes"] += own
    tied = getattr(config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in quantized or (tied and name == "lm_head.weight"):
            continue
        if any(owner == q or owner.startswith(q + ".") for q in quantized):
            continue
        tensors[name] = t.detach().contiguous()
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": False, "group_size": group_size,
                        "strategy": "group", "dynamic": False}}},
        "ignore": sorted({n for n, m in model.named_modules() if (is_linear_like(m) or isinstance(m, QuantLinear))
                          and n not in quantized}),
        "kv_cache_scheme": None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            (tmp / "generation_config.json").write_text(model.generation_config.to_json_string())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["bytes"] = sum(p.stat().st_size for p in out.iterdir())
    return report
