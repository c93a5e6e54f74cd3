"""Training throughput of `lowbit train`'s step, per size and precision, against the machine's own GEMM rate.

For each harness size and each variant (fp32; bf16 autocast; b1.58 with its fused integer forward in fp32 and under
bf16 autocast, and with the float estimators it had before; each also under torch.compile) it times
``lowbit.train.pretrain.train_step`` (forward, backward, clipping, AdamW: the step `lowbit train` runs) on random
token batches, and reports tokens/s and the model FLOP rate it implies: 6 * (non-embedding parameters + the tied
head) FLOPs per token plus attention's 12 * layers * seq * hidden (Kaplan et al., 2020; Chinchilla's count), as a
fraction of the GEMM rate of the variant's dtype (bf16 for the bf16 variant, fp32 for the others) measured here:
on the MLP's own matrix shape and on a large square product (the machine's rate).

Usage: python benchmarks/bench_train_speed.py [--sizes tiny,small,base] [--variants fp32,bf16,b1.58,...]
       [--compile] [--steps 6] [--batch 16] [--seq 256]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit.nn import TrainableBitLinear
from lowbit.train.model import SIZES
from lowbit.train.pretrain import TrainConfig, make_model, make_optimizer, train_step

ROOT = Path(__file__).resolve().parent
# variant: (--bits, --precision). b1.58-float: the layer's float estimators around F.linear (the fused integer
# forward off), as the harness ran before it.
VARIANTS = {"fp32": ("32", "fp32"), "bf16": ("16", "bf16"), "b1.58": ("1.58", "fp32"), "b1.58-bf16": ("1.58", "bf16"),
            "b1.58-float": ("1.58", "fp32")}


class _Tok:  # what make_model reads of a tokenizer
    def __init__(self, vocab: int) -> None:
        self.vocab, self.bos_token_id, self.eos_token_id = vocab, 0, 0

    def __len__(self) -> int:
        return self.vocab


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of torch.mm [m, k] @ [k, n] in ``dtype`` (the best of a second of repeats)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def flops_per_token(size: str, vocab: int, seq: int) -> float:
    d = SIZES[size]
    h, f, layers = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    params = layers * (4 * h * h + 3 * h * f) + vocab * h  # the blocks' matrices and the (tied) output head
    return 6 * params + 12 * layers * seq * h


def time_steps(cfg: TrainConfig, steps: int, compile_: bool) -> float:
    """Seconds per step (median of ``steps`` after two warm-up steps; compilation happens in the warm-up)."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # each run compiles afresh (else the runs' recompilations reach dynamo's cache limit)
    model = make_model(cfg, _Tok(cfg.vocab))
    opt = make_optimizer(model, cfg)
    forward = torch.compile(model) if compile_ else model
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        batch = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
        t = time.perf_counter()
        train_step(forward, model, opt, batch, cfg)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small,base")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--compile", action="store_true", help="also each variant under torch.compile")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    peak = {name: gemm_rate(2048, 2048, 2048, dtype, 3.0) for name, dtype in (("fp32", torch.float32),
                                                                               ("bf16", torch.bfloat16))}
    print(f"machine GEMM rate (torch.mm 2048^3, best of 3 s): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
    rows = []
    for size in args.sizes.split(","):
        d = SIZES[size]
        m, h, f = args.batch * args.seq, d["hidden_size"], d["intermediate_size"]
        rate = {name: gemm_rate(m, h, f, dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        print(f"\n{size}: GEMM [{m}, {h}] @ [{h}, {f}]: fp32 {rate['fp32'] / 1e9:.1f} GFLOP/s, "
              f"bf16 {rate['bf16'] / 1e9:.1f} GFLOP/s")
        print("| variant | compiled | s/step | tokens/s | GFLOP/s | of its GEMM rate (shape) | of machine rate |")
        print("|---|---|---|---|---|---|---|")
        for variant in args.variants.split(","):
            bits, precision = VARIANTS[variant]
            for compile_ in (False, True) if args.compile else (False,):
                cfg = TrainConfig(size=size, bits=bits, batch=args.batch, seq=args.seq, vocab=args.vocab, steps=1000,
                                  precision=precision)
                TrainableBitLinear.fused = variant != "b1.58-float"
                sec = time_steps(cfg, args.steps, compile_)
                tps = args.batch * args.seq / sec
                gflops = tps * flops_per_token(size, args.vocab, args.seq) / 1e9
                dtype = precision if precision == "bf16" else "fp32"  # the rate of the GEMMs the variant runs
                row = {"size": size, "variant": variant, "compiled": compile_, "s_per_step": sec, "tokens_per_s": tps,
                       "gflops": gflops, "gemm_dtype": dtype, "gemm_shape_gflops": rate[dtype] / 1e9,
                       "gemm_machine_gflops": peak[dtype] / 1e9}
                rows.append(row)
                print(f"| {variant} | {'yes' if compile_ else 'no'} | {sec:.3f} | {tps:,.0f} | {gflops:.1f} | "
                      f"{gflops * 1e9 / rate[dtype]:.0%} ({dtype}) | {gflops * 1e9 / peak[dtype]:.0%} ({dtype}) |",
                      flush=True)
    out = ROOT / "results" / "train_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
