"""QLoRA on SmolLM2-135M with 1 process, DDP on N and FSDP on N (torchrun, gloo, CPUs): the losses' agreement,
each process's model memory and peak RSS, step time and scaling.

Every run has the same global batch (4 x 256 tokens), seed and steps; with N processes each takes batch/N rows and
one thread per core share. Writes benchmarks/results/distributed.json.
Usage: python benchmarks/bench_distributed.py [--steps 20] [--nproc 2] [--method nf4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--method", default="nf4")
    args = ap.parse_args()
    from lowbit.data import default_text
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="lowbit-dist-"))
    text = work / "text.txt"
    text.write_text(default_text())
    cores = os.cpu_count() or 1
    rows = {}
    try:
        for name, nproc, parallel in (("1 process", 1, "ddp"), (f"DDP x{args.nproc}", args.nproc, "ddp"),
                                      (f"FSDP x{args.nproc}", args.nproc, "fsdp")):
            out = work / name.replace(" ", "-")
            cmd = [sys.executable, "-m", "lowbit", "finetune", "smollm2-135m", "--data", str(text), "--method", args.method,
                   "--steps", str(args.steps), "--batch", "4", "--seq", "256", "--eval-tokens", "2048",
                   "--save-every", str(args.steps), "--out", str(out), "--nproc", str(nproc), "--parallel", parallel,
                   "--threads", str(max(1, cores // nproc))]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                continue
            rows[name] = json.loads((out / "summary.json").read_text())
            s = rows[name]
            print(f"{name}: {s['step_seconds']:.2f} s/step, loss {s['final_loss']:.4f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows.get("1 process")
    print("\n| run | s/step | speed-up | max rel. loss diff vs 1 process | model MB per process | peak RSS MB per process |")
    print("|---|---|---|---|---|---|")
    for name, s in rows.items():
        diff = max(abs(a - b) / abs(b) for a, b in zip(s["losses"], base["losses"])) if base else float("nan")
        mem = ", ".join(f"{m['model_bytes'] / 1e6:.0f}" for m in s["process_memory"])
        rss = ", ".join(f"{m['peak_rss_bytes'] / 1e6:.0f}" for m in s["process_memory"])
        speed = base["step_seconds"] / s["step_seconds"] if base else float("nan")
        print(f"| {name} | {s['step_seconds']:.2f} | {speed:.2f}x | {diff:.2e} | {mem} | {rss} |")
    out = ROOT / "benchmarks" / "results" / "distributed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
