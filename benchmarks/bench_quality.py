"""Perplexity of SmolLM2-135M quantized with each lowbit layer, beside bitsandbytes' layers, in one run.

Protocol (as ../shared/models.md): first 8192 tokens of the text, non-overlapping 512-token windows,
loss over every predicted token, fp32 compute. Usage: python benchmarks/bench_quality.py [--tokens 8192]
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import lowbit
from lowbit.eval import memory_report, perplexity
from lowbit.app.models import load_default_model

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def bnb_swap(model, kind: str):
    """The same model with bitsandbytes' Linear4bit (NF4) or Linear8bitLt layers, in eval mode."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and "layers." in name:
            if kind == "nf4":
                new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, mod.bias is not None,
                                        compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                new.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                               compress_statistics=True, blocksize=64)
                new.weight = new.weight._quantize("cpu") if hasattr(new.weight, "_quantize") else new.weight
            else:
                new = bnb.nn.Linear8bitLt(mod.in_features, mod.out_features, mod.bias is not None,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(mod.weight.data, requires_grad=False, has_fp16_weights=False)
                new.weight = new.weight._quantize("cpu") if hasattr(new.weight, "_quantize") else new.weight
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--no-bnb", action="store_true")
    args = ap.parse_args()
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    model, tok = load_default_model()
    texts = {"python-tutorial": (SHARED / "python-tutorial.txt").read_text()}
    wiki = SHARED / "wikipedia-sample.txt"
    if wiki.exists():
        texts["wikipedia-sample"] = wiki.read_text()
    variants = {
        "fp32": lambda m: m,
        "int8 (LLM.int8, threshold 6)": lambda m: lowbit.quantize(m, lowbit.Int8Config(threshold=6.0), progress=False),
        "int8 (LLM.int8, zeropoint activations)": lambda m: lowbit.quantize(
            m, lowbit.Int8Config(threshold=6.0, activations="zeropoint"), progress=False),
        "int8 weight-only": lambda m: lowbit.quantize(m, lowbit.Int8Config(weight_only=True), progress=False),
        "nf4 bs64": lambda m: lowbit.quantize(m, lowbit.NF4Config(double_quant=False), progress=False),
        "nf4 bs64 + double quant": lambda m: lowbit.quantize(m, lowbit.NF4Config(double_quant=True), progress=False),
        "fp4 bs64 + double quant": lambda m: lowbit.quantize(m, lowbit.NF4Config(quant_type="fp4"), progress=False),
        "int4 group 64": lambda m: lowbit.quantize(m, lowbit.NF4Config(quant_type="int4", double_quant=False), progress=False),
        "ternary (PTQ, b1.58 needs training)": lambda m: lowbit.quantize(m, lowbit.TernaryConfig(), progress=False),
    }
    if not args.no_bnb:
        variants["bitsandbytes NF4 + DQ (eval)"] = lambda m: bnb_swap(m, "nf4")
        variants["bitsandbytes Linear8bitLt 6.0 (eval)"] = lambda m: bnb_swap(m, "int8")
        # In training mode bitsandbytes' CPU path dequantizes the weight and never quantizes activations.
        variants["bitsandbytes Linear8bitLt 6.0 (training mode)"] = lambda m: bnb_swap(m, "int8").train()
    results = []
    for name, make in variants.items():
        m = make(copy.deepcopy(model))
        row = {"method": name, "bits_per_param": memory_report(m)["bits_per_param"] if not name.startswith("bitsandbytes") else None}
        for tname, text in texts.items():
            row[tname] = perplexity(m, tok, text, tokens=args.tokens, progress=False)
        results.append(row)
        print(f"{name:40} " + "  ".join(f"{t}: {row[t]:9.3f} ({row[t] / results[0][t]:.4f}x)" for t in texts), flush=True)
    by = {r["method"]: r for r in results}
    for t in texts:
        ratio = lambda m: by[m][t] / by["fp32"][t]
        checks = [("LLM.int8 (threshold 6) ratio <= 1.005", ratio("int8 (LLM.int8, threshold 6)") <= 1.005),
                  ("LLM.int8 (threshold 6, zero-point activations) ratio <= 1.005",
                   ratio("int8 (LLM.int8, zeropoint activations)") <= 1.005),
                  ("int8 weight-only ratio <= 1.005", ratio("int8 weight-only") <= 1.005)]
        if "bitsandbytes NF4 + DQ (eval)" in by:
            rel = by["nf4 bs64 + double quant"][t] / by["bitsandbytes NF4 + DQ (eval)"][t]
            checks.append((f"NF4+DQ vs bitsandbytes NF4+DQ: {rel:.4f} (no worse than 1.002)", rel <= 1.002))
        for what, ok in checks:
            print(f"[{t}] {'met   ' if ok else 'MISSED'} {what}")
    out = Path(__file__).parent / "results" / "quality.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "window": 512, "results": results}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
