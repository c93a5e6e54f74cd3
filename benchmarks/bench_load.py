"""Peak memory of lowbit.load on SmolLM2-135M checkpoints, each load in a fresh process.

Prints, per format: checkpoint size on disk, the process's resident memory after importing torch and
transformers (before loading), its peak during the load, and the fp32 size of the model's weights.
Usage: python benchmarks/bench_load.py [--formats nf4,int8,ternary]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch, transformers, lowbit
def status_mb(field):  # VmRSS: resident now; VmHWM: peak. (ru_maxrss would carry the parent's peak over exec.)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) / 1e3
rss_mb = lambda: status_mb("VmRSS")
before = rss_mb()
t = time.perf_counter()
model = lowbit.load(sys.argv[1])
seconds = time.perf_counter() - t
report = lowbit.memory_report(model)
print(json.dumps({"rss_before_mb": before, "peak_rss_mb": status_mb("VmHWM"),
                  "load_s": seconds, "model_mb": report["total_bytes"] / 1e6, "fp32_mb": report["fp32_bytes"] / 1e6}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="nf4,int8,ternary")
    args = ap.parse_args()
    import lowbit
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    from lowbit.app.models import load_default_model

    configs = {"nf4": lowbit.NF4Config(), "int8": lowbit.Int8Config(), "ternary": lowbit.TernaryConfig()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            model, _ = load_default_model()
            lowbit.quantize(model, configs[fmt], progress=False)
            path = Path(tmp) / fmt
            lowbit.save(model, path)
            del model
            disk = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e6
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"loading {fmt} failed:\n{out.stderr}")
            row = {"format": fmt, "disk_mb": disk, **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{fmt:8} disk {disk:7.1f} MB  model {row['model_mb']:7.1f} MB  RSS before load {row['rss_before_mb']:6.1f} MB  "
                  f"peak RSS {row['peak_rss_mb']:6.1f} MB (fp32 weights: {row['fp32_mb']:.1f} MB)  load {row['load_s']:.2f} s",
                  flush=True)
    out = Path(__file__).parent / "results" / "load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
