"""The benchmarks' timing helper: the median wall time of repeated calls.

Benchmarks run as scripts (``python benchmarks/bench_x.py``), which puts this folder first on sys.path, so they import
it as ``from timing import median_seconds``.
"""
import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` timed calls of ``fn()``, after ``warmup`` untimed ones (first touch, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
