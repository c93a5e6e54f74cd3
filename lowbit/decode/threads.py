"""Choosing decode threads while decoding: all of torch's threads, or one when other work shares the cores."""
from __future__ import annotations

import statistics
import time

import torch


class ThreadChooser:
    """Times a few decode steps on torch's thread count and a few on one thread, keeps the faster, and looks again
    every ``every`` steps (the machine's load changes).

    A fork-join step waits for its slowest thread: with one of 2 cores busy, 2 threads decode SmolLM2 3.9x slower
    than on a quiet machine, 1 thread hardly slower (docs/speed.md)."""

    def __init__(self, every: int = 64, probe: int = 3) -> None:
        self.most = torch.get_num_threads()
        self.every, self.probe = every, probe
        self.choice, self.start, self.times = self.most, 0.0, {}

    def _probing(self, step: int) -> int | None:
        i = step % self.every
        return (self.most, 1)[i // self.probe] if i < 2 * self.probe and self.most > 1 else None

    def before(self, step: int) -> None:
        """Set the thread count for decode step ``step``."""
        probing = self._probing(step)
        torch.set_num_threads(probing or self.choice)
        self.start = time.perf_counter()

    def after(self, step: int) -> None:
        """Record step ``step``'s time; after a probe, keep the faster count."""
        probing = self._probing(step)
        if probing is None:
            return
        self.times.setdefault(probing, []).append(time.perf_counter() - self.start)
        if step % self.every == 2 * self.probe - 1:
            self.choice = min(self.times, key=lambda n: statistics.median(self.times[n]))
            self.times = {}
