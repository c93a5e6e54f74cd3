"""Fuzz lowbit.load, transformers' from_pretrained and the bitsandbytes-checkpoint loader with N mutated checkpoints
each (issue 14 item 3; value mutations, issue 32).

Every case must load or raise CheckpointError within 2 s of CPU time; the address space is capped at the start's + 2 GiB, so an
allocation that the (50-100 kB) files cannot justify fails its case. Prints the counts and the outcome.
Usage: python benchmarks/fuzz_checkpoint.py [--cases 10000] [--seed 0]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="cases per reader")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readers", default="lowbit,hf,values,values-hf,bnb",
                    help="comma-separated: lowbit / hf (manifest and shard mutations through lowbit.load / "
                         "from_pretrained), values / values-hf (value mutations, checksums fixed), bnb")
    args = ap.parse_args()
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # mutated configs make transformers chatty
    import torch
    import traceback

    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    import checkpoint_fuzz as fz
    from lowbit.eval.speed import machine

    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    root = Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    good = fz.make_checkpoints(root)
    vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))
    readers = {"lowbit": ("lowbit.load", fz.mutated_lowbit, fz.read_lowbit, good[0]),
               "hf": ("from_pretrained", fz.mutated_lowbit, fz.read_hf, good[0]),
               "values": ("lowbit.load, values", fz.mutated_values, fz.read_lowbit, good[2]),
               "values-hf": ("from_pretrained, values", fz.mutated_values, fz.read_hf, good[2]),
               "bnb": ("load_bnb_checkpoint", fz.mutated_bnb, fz.read_bnb, good[1])}
    for name, mutate, read, base in (readers[r] for r in args.readers.split(",")):
        counts = Counter()
        t = time.perf_counter()

        @seed(args.seed)
        # No shrinking: every distinct failure is reported as drawn, with where it was raised.
        @settings(max_examples=args.cases, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate], report_multiple_bugs=True)
        @given(st.data())
        def case(data):
            counts["cases"] += 1
            fz.check_case(read(mutate(data.draw, base, root / "case")), counts, forward=mutate is fz.mutated_values)

        try:
            case()
            outcome = "every case loaded or raised CheckpointError within 2 s"
        except Exception as e:  # hypothesis re-raises the failing case(s)
            failures = list(e.exceptions) if isinstance(e, BaseExceptionGroup) else [e]
            lines = []
            for f in failures:
                frame = traceback.extract_tb(f.__traceback__)[-1]
                lines.append(f"{type(f).__name__} at {Path(frame.filename).name}:{frame.lineno}: "
                             f"{str(f).splitlines()[0][:200] if str(f) else ''}")
            outcome = f"FAILED ({len(failures)} distinct):\n  " + "\n  ".join(lines)
        print(f"{name}: {counts['cases']} cases in {time.perf_counter() - t:.0f} s: {counts['loaded']} loaded, "
              f"{counts['CheckpointError']} CheckpointError, slowest {counts['slowest_ms']} ms; {outcome}", flush=True)


if __name__ == "__main__":
    main()
