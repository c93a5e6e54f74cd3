"""LLM.int8 layer by layer: lowbit's Int8Linear against bitsandbytes' Linear8bitLt (eval mode) on the same inputs.

For every block linear layer of SmolLM2-135M (512 tokens of each text) and of random-config models of several
architectures with planted outlier features (lowbit.app.synthetic; 512 tokens of wikipedia-sample), it records the
layer's real inputs and prints the relative error ||y - y_fp32|| / ||y_fp32|| of
  bnb        bitsandbytes 0.50.2 Linear8bitLt, eval mode (its int8_vectorwise_quant + int8_mixed_scaled_mm)
  bnb-rule   bitsandbytes' rule as read from its source, in plain torch (checks that reading: equal to bnb's
             output to float rounding), and one change at a time from it toward lowbit:
  +fp32      the same without bitsandbytes' fp16 cast of the input before quantization
  +cols      the same with each token's scale taken over the non-outlier columns (bitsandbytes zeroes only the
             outlier elements before its absmax, so the small values of an outlier column still set the scale)
  lowbit-absmax  lowbit Int8Linear(activations="absmax"): +fp32 and +cols together, lowbit's kernels
  lowbit     lowbit Int8Linear() (zero-point activations, the default)
and, per layer, whether both libraries chose the same outlier columns. Last, the speed of zero-point against absmax
activations on a SmolLM2 block's seven layers (decode and 128-token prefill, interleaved rounds).

Usage: python benchmarks/bench_int8_layers.py [--archs smollm2,llama,gemma,gemma2,gemma3,qwen2,opt] [--tokens 512]
       [--speed-only]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from lowbit.app.synthetic import ARCHITECTURES, outlier_model
from lowbit.functional import outlier_columns
from lowbit.nn import Int8Linear

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TEXTS = {"python-tutorial": SHARED / "python-tutorial.txt", "wikipedia-sample": SHARED / "wikipedia-sample.txt"}


def bnb_rule(x: torch.Tensor, linear: torch.nn.Linear, threshold: float = 6.0, fp16: bool = True,
             cols_scale: bool = False) -> torch.Tensor:
    """bitsandbytes' eval-mode LLM.int8 as its CPU code reads, in float64 where it is exact; ``fp16=False`` and
    ``cols_scale=True`` each undo one of its choices."""
    w = linear.weight.detach().float()
    w16 = w.half().float()  # Int8Params quantizes the fp16 weight
    w_absmax = w16.abs().amax(1)
    wq = torch.round(w16 * (127.0 / w_absmax).unsqueeze(1))
    a = x.half().float() if fp16 else x.clone()  # MatMul8bitLt casts A to fp16 for quantization only
    hit = a.abs() >= threshold
    cols = hit.any(0)
    a = a.masked_fill(cols.unsqueeze(0) if cols_scale else hit, 0.0)  # bnb: zero the outlier elements, then absmax
    x_absmax = a.abs().amax(1)
    xq = torch.round(a * (127.0 / x_absmax).unsqueeze(1))
    xq[:, cols] = 0
    acc = xq.double() @ wq.double().t()
    y = acc * (x_absmax.double().unsqueeze(1) * w_absmax.double()) * 6.200124e-05  # bnb's constant for 1 / 127^2
    y = y + x[:, cols].double() @ (wq[:, cols].double() * (w_absmax.double() / 127).unsqueeze(1)).t()
    if linear.bias is not None:
        y = y + linear.bias.double()
    return y


def layer_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float32 input [tokens, features] of every block nn.Linear of ``model`` on ``ids``."""
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ("layers." in name or "layer." in name):
            hooks.append(module.register_forward_hook(
                lambda m, a, o, n=name: inputs.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]).clone())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return inputs


@torch.no_grad()
def compare_layer(x: torch.Tensor, linear: torch.nn.Linear, threshold: float = 6.0) -> dict:
    """Relative errors of each variant on one layer's input, and whether the outlier columns agree."""
    from bitsandbytes import functional as bf
    from lowbit.app.peers import bnb_int8_layer

    exact = torch.nn.functional.linear(x.double(), linear.weight.double(),
                                       None if linear.bias is None else linear.bias.double())
    err = lambda y: float((y.double() - exact).norm() / exact.norm())
    _, _, bnb_cols = bf.int8_vectorwise_quant(x.half(), threshold=threshold)
    bnb_cols = torch.zeros(0, dtype=torch.int64) if bnb_cols is None else bnb_cols.long()
    lowbit_cols = outlier_columns(x, threshold)
    theirs, rule = bnb_int8_layer(linear, threshold)(x).double(), bnb_rule(x, linear, threshold)
    row = {
        "outlier_cols": int(lowbit_cols.numel()),
        "same_cols": torch.equal(bnb_cols, lowbit_cols),
        "bnb": err(theirs),
        "bnb-rule": err(rule),
        "+fp32": err(bnb_rule(x, linear, threshold, fp16=False)),
        "+cols": err(bnb_rule(x, linear, threshold, cols_scale=True)),
        "lowbit-absmax": err(Int8Linear.from_linear(linear, threshold, activations="absmax")(x)),
        "lowbit": err(Int8Linear.from_linear(linear, threshold)(x)),
        "rule_vs_bnb": float((rule - theirs).abs().max()),
    }
    return row


VARIANTS = ("bnb", "bnb-rule", "+fp32", "+cols", "lowbit-absmax", "lowbit")


@torch.no_grad()
def block_speed(model, ids: torch.Tensor, rounds: int = 15) -> dict:
    """ms for one pass over block 0's linear layers, zero-point against absmax activations, decode (1 token) and
    prefill (128 tokens) on their real inputs: the minimum over ``rounds`` interleaved rounds (the two differ by less
    than a busy machine's noise, so a median of separate runs cannot order them)."""
    inputs = {n: x for n, x in layer_inputs(model, ids).items() if ".layers.0." in n}
    layers = {a: [(Int8Linear.from_linear(model.get_submodule(n), activations=a), x) for n, x in inputs.items()]
              for a in ("zeropoint", "absmax")}
    best = {}
    for rows, reps in ((1, 200), (128, 10)):
        for _ in range(rounds):
            for a, pairs in layers.items():
                start = time.perf_counter()
                for _ in range(reps):
                    for layer, x in pairs:
                        layer(x[:rows])
                ms = (time.perf_counter() - start) / reps * 1e3
                best[(rows, a)] = min(best.get((rows, a), ms), ms)
    return {f"{'decode' if rows == 1 else 'prefill 128'} {a}": ms for (rows, a), ms in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="smollm2," + ",".join(ARCHITECTURES))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--speed-only", action="store_true", help="only the zero-point / absmax timing of a SmolLM2 block")
    args = ap.parse_args()
    from lowbit.app.models import load_default_model
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    smol, tok = load_default_model()
    results = {}
    for arch in [] if args.speed_only else args.archs.split(","):
        runs = []
        if arch == "smollm2":
            for tname, path in TEXTS.items():
                runs.append((f"smollm2/{tname}", smol, tok(path.read_text()[:200_000], return_tensors="pt").input_ids[:, :args.tokens]))
        else:
            ids = tok(TEXTS["wikipedia-sample"].read_text()[:200_000], return_tensors="pt").input_ids[:, :args.tokens]
            runs.append((arch, outlier_model(arch), ids))
        for label, model, ids in runs:
            rows = {}
            for name, x in layer_inputs(model, ids).items():
                rows[name] = compare_layer(x, model.get_submodule(name))
            results[label] = rows
            by_kind = defaultdict(list)
            for name, r in rows.items():
                by_kind[name.rsplit(".", 1)[1]].append(r)
            print(f"\n{label}: mean relative error per layer kind ({len(rows)} layers)")
            print(f"{'layer':10} {'cols':>6} {'same':>5} " + " ".join(f"{v:>13}" for v in VARIANTS))
            for kind, rs in by_kind.items():
                mean = lambda k: sum(r[k] for r in rs) / len(rs)
                same = all(r["same_cols"] for r in rs)
                print(f"{kind:10} {mean('outlier_cols'):6.1f} {str(same):>5} " + " ".join(f"{mean(v):13.5f}" for v in VARIANTS))
            worse = [n for n, r in rows.items() if r["lowbit"] > r["bnb"]]
            worse_abs = [n for n, r in rows.items() if r["lowbit-absmax"] > r["bnb"]]
            ratio = max(r["lowbit"] / r["bnb"] for r in rows.values())
            print(f"layers where lowbit > bnb: {len(worse)} of {len(rows)} {worse[:4]}; lowbit-absmax > bnb: "
                  f"{len(worse_abs)}; worst lowbit / bnb {ratio:.3f}; bnb-rule vs bnb max |diff| "
                  f"{max(r['rule_vs_bnb'] for r in rows.values()):.2e}; outlier columns equal in "
                  f"{sum(r['same_cols'] for r in rows.values())} of {len(rows)} layers")
    speed = block_speed(smol, tok(TEXTS["python-tutorial"].read_text()[:20_000], return_tensors="pt").input_ids[:, :128])
    print("\nSmolLM2 block 0's 7 linear layers, ms per pass (min of 15 interleaved rounds): " +
          ", ".join(f"{k} {v:.3f}" for k, v in speed.items()))
    results["block_speed_ms"] = speed
    out = Path(__file__).parent / "results" / "int8_layers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "tokens": args.tokens, "results": results}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
