"""The other route issue 34 named for a decode step without per-operation overhead: transformers' static KV cache
with its forward compiled by torch.compile (inductor's C++ wrapper on CPU), against lowbit's native step, on the
same model in the same run (SmolLM2-135M, fp32 and NF4, greedy, one sequence).

Usage: python benchmarks/bench_compiled_step.py [--new 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import os
import time

# inductor compiles in a pool of worker processes that outlive the compile: on 2 cores they would share the CPU
# with the timed steps
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch

import lowbit
from lowbit.app.models import load_default_model
from lowbit.decode import StaticDecoder
from lowbit.eval.speed import machine


@torch.no_grad()
def compiled_ms_per_token(model, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(seconds to compile, ms per decoded token) of transformers' forward on a StaticCache under torch.compile."""
    from transformers import StaticCache

    length = ids.shape[1] + new + 1
    forward = torch.compile(model.forward, dynamic=False, fullgraph=False)

    def run() -> float:
        cache = StaticCache(config=model.config, max_cache_len=length)
        out = model(ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1]), use_cache=True)
        token = out.logits[:, -1].argmax(-1)[:, None]
        start = time.perf_counter()
        for i in range(new):
            pos = torch.tensor([ids.shape[1] + i])
            out = forward(token, past_key_values=cache, cache_position=pos, use_cache=True)
            token = out.logits[:, -1].argmax(-1)[:, None]
        return (time.perf_counter() - start) / new * 1e3

    start = time.perf_counter()
    run()  # compiles
    compile_s = time.perf_counter() - start
    return compile_s, min(run() for _ in range(3))


@torch.no_grad()
def native_ms_per_token(model, ids: torch.Tensor, new: int) -> float:
    def run() -> float:
        decoder = StaticDecoder(model, 1, ids.shape[1] + new + 1)
        token = decoder.forward(ids).argmax(-1)[:, None]
        start = time.perf_counter()
        for _ in range(new):
            token = decoder.forward(token).argmax(-1)[:, None]
        return (time.perf_counter() - start) / new * 1e3
    run()
    return min(run() for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["LOWBIT_DECODE_ACTIVATIONS"] = "float32"  # the same arithmetic on both routes
    print(f"machine: {machine()}")
    base, tok = load_default_model()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    print("| model | torch.compile: compile s | ms/token | lowbit native step ms/token |\n|---|---|---|---|")
    for name in ("fp32", "nf4"):
        model = base if name == "fp32" else lowbit.quantize(copy.deepcopy(base), "nf4", progress=False)
        native = native_ms_per_token(model, ids, args.new)  # first: nothing of the compiler's is running yet
        compile_s, compiled = compiled_ms_per_token(model, ids, args.new)
        print(f"| {name} | {compile_s:.1f} | {compiled:.2f} | {native:.2f} |", flush=True)


if __name__ == "__main__":
    main()
