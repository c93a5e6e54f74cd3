"""Throughput of lowbit's quantize/dequantize primitives beside bitsandbytes' CPU functions, in one run.

Usage: python benchmarks/bench_quantize.py [--threads 2] [--repeats 7]
Prints a table (GB/s of fp32 input for quantize, of fp32 output for dequantize) and writes JSON to
benchmarks/results/quantize.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lowbit.functional as F
from lowbit import kernels
from timing import median_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import bitsandbytes.functional as bnbf

    from lowbit.eval.speed import machine

    assert kernels.fast() is not None, "C++ kernels did not build; see the warning above"
    x = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    gb = x.numel() * 4 / 1e9
    out = torch.empty_like(x)
    q_nf4, q_dq = F.quantize_4bit(x, "nf4", 64), F.quantize_4bit(x, "nf4", 64, double_quant=True)
    q8 = F.quantize_blockwise(x, "dynamic", 256)
    b_nf4, b_state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")
    b_dq, b_dq_state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    b8, b8_state = bnbf.quantize_blockwise(x, blocksize=256)
    int8_bnb = torch.ops.bitsandbytes.int8_vectorwise_quant.default

    cases = [
        # (primitive, lowbit fn, bitsandbytes fn or None)
        ("NF4 quantize (bs 64)", lambda: F.quantize_4bit(x, "nf4", 64), lambda: bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")),
        ("NF4 + double quant quantize", lambda: F.quantize_4bit(x, "nf4", 64, True),
         lambda: bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)),
        ("NF4 dequantize (new output)", lambda: F.dequantize_4bit(q_nf4), lambda: bnbf.dequantize_4bit(b_nf4, b_state)),
        ("NF4 dequantize (into out=)", lambda: F.dequantize_4bit(q_nf4, out=out), lambda: bnbf.dequantize_4bit(b_nf4, b_state)),  # bnb has no CPU out=
        ("NF4+DQ dequantize (into out=)", lambda: F.dequantize_4bit(q_dq, out=out), lambda: bnbf.dequantize_4bit(b_dq, b_dq_state)),
        ("int8 vector-wise quantize", lambda: F.quantize_absmax(x, dim=-1), lambda: int8_bnb(x, 0.0)),
        ("8-bit blockwise quantize (bs 256)", lambda: F.quantize_blockwise(x, "dynamic", 256), lambda: bnbf.quantize_blockwise(x, blocksize=256)),
        ("8-bit blockwise dequantize (out=)", lambda: F.dequantize_blockwise(q8, out=out), lambda: bnbf.dequantize_blockwise(b8, b8_state)),
        ("ternary absmean quantize + pack", lambda: F.quantize_ternary(x), None),
    ]
    rows = []
    for name, ours, theirs in cases:
        t_ours = median_seconds(ours, args.repeats)
        with kernels.reference_only():
            t_ref = median_seconds(ours, max(1, args.repeats // 3))
        t_bnb = median_seconds(theirs, args.repeats) if theirs else None
        rows.append({
            "primitive": name,
            "lowbit_ms": t_ours * 1e3,
            "lowbit_GBps": gb / t_ours,
            "plain_torch_GBps": gb / t_ref,
            "bitsandbytes_GBps": gb / t_bnb if t_bnb else None,
            "speedup_vs_bitsandbytes": t_bnb / t_ours if t_bnb else None,
        })
    header = f"{'primitive':36} {'lowbit ms':>10} {'lowbit GB/s':>12} {'plain torch':>12} {'bnb GB/s':>9} {'vs bnb':>7}"
    print(f"tensor {args.rows}x{args.cols} fp32 ({gb:.2f} GB), {args.threads} threads, median of {args.repeats}; "
          f"bitsandbytes {__import__('bitsandbytes').__version__}\nmachine: {machine()}")
    print(header)
    print("-" * len(header))
    for r in rows:
        bnb = f"{r['bitsandbytes_GBps']:9.2f}" if r["bitsandbytes_GBps"] else f"{'-':>9}"
        sp = f"{r['speedup_vs_bitsandbytes']:6.1f}x" if r["speedup_vs_bitsandbytes"] else f"{'-':>7}"
        print(f"{r['primitive']:36} {r['lowbit_ms']:10.1f} {r['lowbit_GBps']:12.2f} {r['plain_torch_GBps']:12.2f} {bnb} {sp}")
    path = Path(__file__).parent / "results" / "quantize.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"shape": [args.rows, args.cols], "threads": args.threads, "rows": rows}, indent=1))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
