"""What checking a checkpoint's values costs next to loading it (issue 32): SmolLM2-135M saved as NF4, int8 and
ternary, then `lowbit.load` (checksums and value checks included) and `checkpoint.check_layers` alone, in CPU
seconds of this process (min of 3), so that another job on the machine counts less.

Usage: python benchmarks/bench_value_checks.py [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.app.models import load_default_model
from lowbit.checkpoint import check_layers
from lowbit.eval.speed import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    model, _ = load_default_model()
    root = Path(tempfile.mkdtemp(prefix="lowbit-checks-"))
    for name, config in (("nf4", lowbit.NF4Config()), ("int8", lowbit.Int8Config()),
                         ("ternary", lowbit.TernaryConfig())):
        folder = lowbit.save(lowbit.quantize(copy.deepcopy(model), config, progress=False), root / name)
        loads, checks = [], []
        for _ in range(3):
            t = time.process_time()
            loaded = lowbit.load(folder)
            loads.append(time.process_time() - t)
            t = time.process_time()
            check_layers(loaded, {})
            checks.append(time.process_time() - t)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"{name}: {size / 1e6:.0f} MB, lowbit.load {min(loads) * 1e3:.0f} ms CPU (checks included), "
              f"check_layers {min(checks) * 1e3:.0f} ms CPU ({min(checks) / min(loads) * 100:.1f}%)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
