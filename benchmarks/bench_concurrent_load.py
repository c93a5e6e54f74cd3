"""Loads racing saves (issue 14 item 4): one process saves two different models into a folder in turn, this one
loads it again and again; prints loads tried, loads that saw one whole checkpoint, and failures.
Usage: python benchmarks/bench_concurrent_load.py [--seconds 60]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    from lowbit.eval.speed import machine
    from test_manifest import race

    print(f"machine: {machine()}")
    c = race(Path(tempfile.mkdtemp(prefix="lowbit-race-")) / "ck", args.seconds)
    print(f"{c['saves']} saves in {args.seconds:.0f} s by the other process; {c['loads']} loads tried: "
          f"{c['first'] + c['second']} saw a whole checkpoint ({c['first']} the NF4 one, {c['second']} the int8 one), "
          f"{c['failed']} failed" + (f" (first: {c['error']})" if c["error"] else ""))


if __name__ == "__main__":
    main()
