"""Low-bit matmul on CPU: lowbit's kernels beside dense fp32/bf16, torch's built-in packed ops and bitsandbytes.

One run measures every row (the machine is shared; only ratios taken in one run hold): a two-thread
memory-read probe, then decode (x[1, K]) and prefill (x[256, K]) for W[N, K] (default the 7B MLP shape
4096 -> 11008), medians of repeated calls. Each row: ms, GB/s of stored weight bytes, fraction of the
bandwidth floor (bytes / probe bandwidth), speed-up over dense bf16 and over bitsandbytes' layer in eval mode.
Prints Markdown tables and writes benchmarks/results/kernels.json.
Usage: python benchmarks/bench_kernels.py [--n 11008] [--k 4096] [--threads 2] [--no-e2e]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

import lowbit
from lowbit.functional.grouped import SpQRWeight
from lowbit.nn import BitLinear, Int8Linear, IntLinear, Linear4bit, SpQRLinear
from timing import median_seconds


def read_probe(mb: int = 256):
    """(bytes, fn): a read on every thread, with 64-byte loads, of a buffer much larger than the caches."""
    from lowbit.kernels import fast

    x = torch.ones(mb * 2**20 // 4)
    ext = fast()
    return x.numel() * 4, (lambda: ext.read_probe(x)) if ext is not None else (lambda: x.sum())


def real_activation(k: int) -> torch.Tensor:
    """A hidden state of SmolLM2-135M (its outlier feature included), tiled to k features."""
    from lowbit.app.models import load_default_model

    model, tok = load_default_model()
    captured = {}
    layer = model.model.layers[10].self_attn.q_proj
    def grab(module, args):
        captured["x"] = args[0][0, -1].detach().clone()

    handle = layer.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(tok("The Python tutorial explains lists, loops and functions.", return_tensors="pt").input_ids)
    handle.remove()
    x = captured["x"]
    return x.repeat(-(-k // x.numel()))[:k].unsqueeze(0)


def bnb_layers(weight: torch.Tensor) -> dict:
    """bitsandbytes' NF4 (+DQ) and Linear8bitLt layers for this weight, in eval mode; {} without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    n, k = weight.shape
    out = {}
    nf4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    nf4.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                   blocksize=64)._quantize("cpu")
    out["nf4"] = nf4.eval()
    for t in (0.0, 6.0):
        lt = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=t)
        lt.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
        out[f"int8-t{t:g}"] = lt.eval()
    return out


def synthetic_spqr(n: int, k: int, bits: int, stat_group: int, outlier_share: float = 0.005) -> SpQRLinear:
    """A SpQR layer of the given format with random codes, statistics and outliers (speed depends on the format only;
    calibrating a [11008, 4096] layer would take minutes). 0.5% outliers: SmolLM2's SpQR runs keep about 0.4%."""
    g = torch.Generator().manual_seed(1)
    groups, blocks = -(-k // 16), -(-n // stat_group)
    q = SpQRWeight(codes=torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8),
                   stat_codes=torch.randint(0, 8, (2, n, groups), generator=g, dtype=torch.uint8),
                   stat_scale=torch.rand(2, blocks, groups, generator=g) * 1e-3,
                   stat_zero=torch.rand(2, blocks, groups, generator=g) * 1e-3,
                   outliers=torch.rand(n, k, generator=g) < outlier_share, values=torch.randn(n, k, generator=g) * 0.1)
    return SpQRLinear.from_spqr(q, None, bits, 16, stat_group)


def kernel_rows(n: int, k: int, repeats: int, rounds: int) -> tuple[list[dict], float]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    w = lin.weight.detach()
    wb = w.bfloat16()
    real = real_activation(k)
    x = {torch.float32: torch.randn(1, k), torch.bfloat16: torch.randn(1, k).bfloat16()}
    xp = torch.randn(256, k).bfloat16()
    lowbit_layers = {
        "nf4": Linear4bit.from_linear(lin, "nf4", 64),
        "nf4+dq": Linear4bit.from_linear(lin, "nf4", 64, double_quant=True),
        "fp4+dq": Linear4bit.from_linear(lin, "fp4", 64, double_quant=True),
        "int4 g64": IntLinear.from_linear(lin, 4, 64, scale_dtype="float32"),  # NF4Config(quant_type="int4")
        "gptq int4 g128": IntLinear.from_linear(lin, 4, 128),
        "int2 g64": IntLinear.from_linear(lin, 2, 64),
        "gptq int3 g128": IntLinear.from_linear(lin, 3, 128),
        "spqr 3-bit b16 (0.5% outliers)": synthetic_spqr(n, k, 3, 16),
        "spqr 4-bit b16 stats/32 (0.5% outliers)": synthetic_spqr(n, k, 4, 32),
        "int8 weight-only": Int8Linear.from_linear(lin, weight_only=True),
        "LLM.int8 t=6 (zero-point activations)": Int8Linear.from_linear(lin, threshold=6.0),
        "LLM.int8 t=6 absmax": Int8Linear.from_linear(lin, threshold=6.0, activations="absmax"),
        "ternary 2-bit": BitLinear.from_linear(lin),
    }
    peers = bnb_layers(w)
    i4 = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2) if hasattr(
        torch, "_convert_weight_to_int4pack_for_cpu") else None
    i4sz = torch.rand(k // 128, n, 2).bfloat16()
    i8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    xq = torch.randint(-127, 128, (1, k), dtype=torch.int8)
    entries = []

    def add(fmt, act, nbytes, fn, prefill=None):
        entries.append({"format": fmt, "activations": act, "shape": [n, k], "weight_bytes": nbytes, "fn": fn,
                        "prefill": prefill})

    probe_bytes, probe = read_probe()
    add("memory read probe", "-", probe_bytes, probe)
    with torch.no_grad():
        add("dense fp32", "fp32", w.numel() * 4, lambda: torch.nn.functional.linear(x[torch.float32], w),
            lambda: torch.nn.functional.linear(xp.float(), w))
        add("dense bf16", "bf16", w.numel() * 2, lambda: torch.nn.functional.linear(x[torch.bfloat16], wb),
            lambda: torch.nn.functional.linear(xp, wb))
        if i4 is not None:
            add("torch int4pack g128", "bf16", n * k // 2 + i4sz.numel() * 2,
                lambda: torch._weight_int4pack_mm_for_cpu(x[torch.bfloat16], i4, 128, i4sz),
                lambda: torch._weight_int4pack_mm_for_cpu(xp, i4, 128, i4sz))
        add("torch _int_mm int8", "int8", n * k, lambda: torch._int_mm(xq, i8.t()))
        for name, layer in peers.items():
            fmt = "bitsandbytes " + ("nf4+dq" if name == "nf4" else f"Linear8bitLt {name}")
            xa = x[torch.bfloat16] if name == "nf4" else (real.half() if name == "int8-t6" else x[torch.float32].half())
            add(fmt, {torch.bfloat16: "bf16", torch.float16: "fp16"}[xa.dtype],
                stored_bytes_bnb(layer), lambda l=layer, a=xa: l(a),
                (lambda l=layer: l(xp)) if name == "nf4" else (lambda l=layer: l(xp.half())))
        for name, layer in lowbit_layers.items():
            for dtype in (torch.float32, torch.bfloat16):
                if name.startswith(("LLM", "ternary")) and dtype == torch.bfloat16:
                    continue
                lay = copy.deepcopy(layer)
                lay.compute_dtype = dtype if not name.startswith(("LLM", "ternary")) else lay.compute_dtype
                xa = real if name.startswith("LLM") else x[dtype]
                add("lowbit " + name, "fp32" if dtype == torch.float32 else "bf16", lay.stored_bits() // 8,
                    lambda l=lay, a=xa: l(a), lambda l=lay, d=dtype: l(xp.to(d)))
        # The native decode step's int8-activation kernel (x quantized per block of 8, VNNI), where the build has it.
        from lowbit.kernels import fast
        from lowbit.kernels.matmul import lut_plan

        ext = fast()
        for name in ("nf4", "nf4+dq", "int4 g64"):
            layer = lowbit_layers[name]
            plan = None if ext is None else lut_plan(ext, layer.lut_weight(), torch.float32)
            if plan is not None and plan.takes_int8_x():
                add(f"lowbit {name}, int8 activations (decode step)", "int8", layer.stored_bits() // 8,
                    lambda p=plan: p.gemv_int8x(x[torch.float32]))
        # Rounds over every row, so that the machine's drift hits all rows alike; median of the rounds' medians.
        times = {i: [] for i in range(len(entries))}
        for _ in range(rounds):
            for i, e in enumerate(entries):
                times[i].append(median_seconds(e["fn"], repeats) * 1e3)
        bw = entries[0]["weight_bytes"] / statistics.median(times[0]) / 1e6  # the probe, measured in the rounds too
        rows = []
        for i, e in enumerate(entries):
            ms = statistics.median(times[i])
            row = {key: e[key] for key in ("format", "activations", "shape", "weight_bytes")}
            row.update(decode_ms=ms, gb_s=e["weight_bytes"] / ms / 1e6, roofline=e["weight_bytes"] / bw / 1e6 / ms)
            if e["prefill"] is not None:
                row["prefill256_ms"] = median_seconds(e["prefill"], 3) * 1e3
            rows.append(row)
            print(f"  {row['format']:<36} {row['activations']:<5} {ms:8.3f} ms {row['gb_s']:6.1f} GB/s "
                  f"{row['roofline']:6.1%}" + (f"  prefill {row['prefill256_ms']:.1f} ms" if "prefill256_ms" in row else ""),
                  flush=True)
    return rows, bw


def stored_bytes_bnb(layer) -> int:
    w = layer.weight
    if hasattr(w, "quant_state") and w.quant_state is not None:
        qs = w.quant_state
        extra = qs.absmax.numel() * qs.absmax.element_size()
        if getattr(qs, "state2", None) is not None:
            extra += qs.state2.absmax.numel() * 4
        return w.numel() * w.element_size() + extra
    return w.numel() * w.element_size() + w.shape[0] * 4


def ratios(rows: list[dict]) -> None:
    by = {(r["format"], r["activations"]): r for r in rows}
    bf16 = by[("dense bf16", "bf16")]
    peer_of = {"nf4": ("bitsandbytes nf4+dq", "bf16"), "fp4": ("bitsandbytes nf4+dq", "bf16"),
               "int8 weight-only": ("bitsandbytes Linear8bitLt int8-t0", "fp16"),
               "LLM.int8": ("bitsandbytes Linear8bitLt int8-t6", "fp16")}
    for r in rows:
        r["vs_dense_bf16"] = bf16["decode_ms"] / r["decode_ms"]
        if "prefill256_ms" in r and "prefill256_ms" in bf16:
            r["prefill_vs_dense_bf16"] = r["prefill256_ms"] / bf16["prefill256_ms"]
        for key, peer in peer_of.items():
            if r["format"].startswith("lowbit " + key) and peer in by:
                r["vs_bnb"] = by[peer]["decode_ms"] / r["decode_ms"]
                r["peer"] = peer[0]
                if "prefill256_ms" in r and "prefill256_ms" in by[peer]:
                    r["prefill_vs_bnb"] = by[peer]["prefill256_ms"] / r["prefill256_ms"]


def e2e_rows(repeats: int) -> list[dict]:
    """Greedy decode tokens/s of SmolLM2-135M: dense, lowbit layers, bitsandbytes' layers (eval)."""
    from lowbit.eval.speed import speed
    from lowbit.app.models import load_default_model

    model, _ = load_default_model()
    model.eval()
    variants = {"fp32": lambda m: m, "bf16": lambda m: m.to(torch.bfloat16),
                "lowbit int8 weight-only": lambda m: lowbit.quantize(m, lowbit.Int8Config(weight_only=True), progress=False),
                "lowbit LLM.int8 t=6": lambda m: lowbit.quantize(m, lowbit.Int8Config(), progress=False),
                "lowbit nf4+dq": lambda m: lowbit.quantize(m, lowbit.NF4Config(), progress=False),
                "lowbit int3 g128 (GPTQ's format)": lambda m: lowbit.quantize(m, lowbit.IntConfig(bits=3, group_size=128), progress=False),
                "lowbit nf4+dq bf16": lambda m: lowbit.quantize(m.to(torch.bfloat16), lowbit.NF4Config(compute_dtype=torch.bfloat16), progress=False),
                "lowbit ternary": lambda m: lowbit.quantize(m, lowbit.TernaryConfig(), progress=False)}
    try:
        import bitsandbytes  # noqa: F401
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from lowbit.app.peers import bnb_swap

        variants["bitsandbytes nf4+dq (eval)"] = lambda m: bnb_swap(m, "nf4").eval()
        variants["bitsandbytes Linear8bitLt t=6 (eval)"] = lambda m: bnb_swap(m, "int8").eval()
    except ImportError:
        pass
    rows = []
    for name, make in variants.items():
        m = make(copy.deepcopy(model))
        s = speed(m, prompt_tokens=128, new_tokens=32, repeats=repeats)
        rows.append({"model": name, **s})
        print(f"  {name:<36} prefill {s['prefill_tok_s']:7.1f} tok/s   decode {s['decode_tok_s']:6.1f} tok/s", flush=True)
        del m
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="calls per row per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-e2e", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}\nW [{args.n}, {args.k}]")
    rows, bw = kernel_rows(args.n, args.k, args.repeats, args.rounds)
    ratios(rows)
    print(f"\nbandwidth probe (read, {args.threads} threads): {bw:.1f} GB/s\n")
    print("| format | act | decode ms | GB/s | of floor | vs dense bf16 | vs bitsandbytes | prefill 256 ms | prefill / dense bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pf = f"{r['prefill256_ms']:.1f}" if "prefill256_ms" in r else ""
        pr = f"{r['prefill_vs_dense_bf16']:.2f}x" if "prefill_vs_dense_bf16" in r else ""
        vb = f"{r['vs_bnb']:.2f}x" if "vs_bnb" in r else ""
        print(f"| {r['format']} | {r['activations']} | {r['decode_ms']:.3f} | {r['gb_s']:.1f} | {r['roofline']:.0%} | "
              f"{r['vs_dense_bf16']:.2f}x | {vb} | {pf} | {pr} |")
    e2e = [] if args.no_e2e else e2e_rows(3)
    if e2e:
        print("\n| SmolLM2-135M | prefill tok/s | decode tok/s |\n|---|---|---|")
        for r in e2e:
            print(f"| {r['model']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} |")
    out = Path(__file__).parent / "results" / "kernels.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "bandwidth_gb_s": bw, "rows": rows, "e2e": e2e}, indent=1))


if __name__ == "__main__":
    main()
