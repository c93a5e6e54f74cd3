"""RTN, GPTQ and SpQR at 3 and 4 bits on SmolLM2-135M: bits/param, perplexity on two texts, time, peak memory.

Calibration: 32 sequences of 512 tokens of python-tutorial past its first 8192 tokens (seed 0).
Evaluation: the first 8192 tokens of python-tutorial and of wikipedia-sample, non-overlapping 512-token
windows, fp32 compute. Prints a Markdown table (pasted into docs/calibration.md) and writes JSON.
Usage: python benchmarks/bench_calibrate.py [--methods rtn4,gptq4,...] [--samples 32]
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import lowbit
from lowbit.calibrate import calibration_batches
from lowbit.app.compare import linear_bits_per_param
from lowbit.data import default_text
from lowbit.eval import perplexity
from lowbit.app.models import load_default_model

WIKI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikipedia-sample.txt"
CONFIGS = {
    "rtn4": lowbit.IntConfig(bits=4, group_size=128),
    "gptq4": lowbit.GPTQConfig(bits=4, group_size=128),
    "gptq4-mse": lowbit.GPTQConfig(bits=4, group_size=128, clip_search=True),
    "spqr4": lowbit.SpQRConfig(bits=4, group_size=16),
    "spqr4-s32": lowbit.SpQRConfig(bits=4, group_size=16, stat_group=32),
    "rtn3": lowbit.IntConfig(bits=3, group_size=128),
    "gptq3": lowbit.GPTQConfig(bits=3, group_size=128), "gptq3-g64": lowbit.GPTQConfig(bits=3, group_size=64),
    "spqr3": lowbit.SpQRConfig(bits=3, group_size=16),
    "spqr3-g32": lowbit.SpQRConfig(bits=3, group_size=32),
}
DEFAULT = "rtn4,gptq4,spqr4,spqr4-s32,rtn3,gptq3,gptq3-g64,spqr3,spqr3-g32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=DEFAULT, help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tag", default="all", help="results/calibrate-TAG.json")
    args = ap.parse_args()
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    model, tok = load_default_model()
    texts = {"python-tutorial": default_text()}
    if WIKI.exists():
        texts["wikipedia-sample"] = WIKI.read_text()
    calib = calibration_batches(tok, texts["python-tutorial"], n_samples=args.samples)
    rows = [{"method": "fp32", "bits_per_param": 32.0, **{t: perplexity(model, tok, x, progress=False) for t, x in texts.items()}}]
    print("| method | bits/param | " + " | ".join(f"{t} ppl | ratio" for t in texts) + " | time s | outliers | peak RSS MB |")
    print("|---|---|" + "---|---|" * len(texts) + "---|---|---|")

    def show(r):
        cells = " | ".join(f"{r[t]:.3f} | {r[t] / rows[0][t]:.4f}" for t in texts)
        print(f"| {r['method']} | {r['bits_per_param']:.3f} | {cells} | {r.get('seconds', 0):.0f} | "
              f"{r.get('outlier_share', 0):.4%} | {r.get('peak_rss_mb', 0):.0f} |", flush=True)

    show(rows[0])
    for name in args.methods.split(","):
        config = CONFIGS[name]
        t = time.perf_counter()
        q = lowbit.quantize(copy.deepcopy(model), config, progress=False, calibration=calib)
        row = {"method": name, "config": config.to_dict(), "seconds": time.perf_counter() - t,
               "bits_per_param": linear_bits_per_param(q), **getattr(q, "lowbit_calibration", {})}
        spqr = [m for m in q.modules() if isinstance(m, lowbit.nn.SpQRLinear)]
        if spqr:
            row["outlier_share"] = sum(m.num_outliers() for m in spqr) / sum(m.in_features * m.out_features for m in spqr)
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        row.update({t: perplexity(q, tok, x, progress=False) for t, x in texts.items()})
        rows.append(row)
        show(row)
        del q
        # Written after every row: a long run stopped part way keeps what it measured.
        out = Path(__file__).parent / "results" / f"calibrate-{args.tag}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
