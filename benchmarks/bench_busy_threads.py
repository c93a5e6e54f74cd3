"""Decode speed with 1 and 2 threads on an idle machine and with one core kept busy by another process (issue 14
item 8), and the thread count `--threads` picks by default in each case.

Usage: python benchmarks/bench_busy_threads.py [--methods fp32,nf4] [--wait-policy passive|active]

--wait-policy sets OMP_WAIT_POLICY before torch starts its OpenMP pool: whether a thread that finishes its
share of a parallel region spins for the next one (active) or sleeps at once (passive).
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="fp32,nf4")
    ap.add_argument("--wait-policy", choices=("passive", "active"), default=None)
    ap.add_argument("--threads", default="1,2", help="thread counts to time, comma separated")
    args = ap.parse_args()
    if args.wait_policy:  # read by libgomp once, when torch first starts threads
        os.environ["OMP_WAIT_POLICY"] = args.wait_policy.upper()
    import torch

    from lowbit.app.methods import apply_method
    from lowbit.app.models import load_default_model
    from lowbit.cli.common import default_threads
    from lowbit.eval.speed import machine, speed

    print(f"machine: {machine()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    base, _ = load_default_model()
    models = {m: apply_method(copy.deepcopy(base), m, progress=False) for m in args.methods.split(",")}
    print("| machine state | method | threads | decode tok/s | prefill tok/s |\n|---|---|---|---|---|")
    for state in ("idle", "one core busy"):
        hog = None
        if state != "idle":  # a process that never sleeps, as a neighbour's job would
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1)
        try:
            for name, model in models.items():
                for threads in [int(t) for t in args.threads.split(",")]:
                    torch.set_num_threads(threads)
                    r = speed(model)
                    print(f"| {state} | {name} | {threads} | {r['decode_tok_s']:.2f} | {r['prefill_tok_s']:.0f} |",
                          flush=True)
            print(f"| {state} | (default --threads) | {default_threads()} | | |", flush=True)
        finally:
            if hog is not None:
                hog.kill()


if __name__ == "__main__":
    main()
