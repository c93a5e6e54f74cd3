"""Where QLoRA starts: held-out perplexity before any training of fp32, plain NF4+DQ (adapters at zero) and NF4+DQ with
LoftQ-initialised adapters (rank 16, every linear layer of the blocks), SmolLM2-135M.

Usage: python benchmarks/bench_loftq.py [--rank 16] [--iters 2] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import default_text
from lowbit.eval.perplexity import perplexity
from lowbit.app.models import load_default_model

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikipedia-sample.txt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    import peft

    from lowbit.eval.speed import machine
    from lowbit.train import loftq

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {machine()}")
    texts = {"python-tutorial": default_text()}
    if WIKI.exists():
        texts["wikipedia-sample"] = WIKI.read_text()

    def ppl(model, tok):
        model.eval()
        return {t: perplexity(model, tok, x, tokens=args.tokens, progress=False) for t, x in texts.items()}

    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    rows = {}
    model, tok = load_default_model()
    rows["fp32"] = ppl(model, tok)
    rows["NF4+DQ (QLoRA start: adapters at zero)"] = ppl(lowbit.quantize(model, lowbit.NF4Config(), progress=False), tok)
    model, _ = load_default_model()
    t = time.perf_counter()
    model = loftq(model, lowbit.NF4Config(), config, iters=args.iters)
    took = time.perf_counter() - t
    rows[f"NF4+DQ + LoftQ adapters (rank {args.rank}, {args.iters} iterations, {took:.0f} s)"] = ppl(model, tok)
    print("| model | " + " | ".join(f"{t} ppl | vs fp32" for t in texts) + " |")
    print("|---|" + "---|---|" * len(texts))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[t]:.3f} | {r[t] / rows['fp32'][t]:.4f}" for t in texts) + " |")
    out = Path(__file__).parent / "results" / "loftq.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rank": args.rank, "iters": args.iters, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
