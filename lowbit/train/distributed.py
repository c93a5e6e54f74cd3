"""Fine-tuning on several processes with torch.distributed (launched by torchrun): DDP or FSDP over a quantized base.

DDP: every process holds the whole model; the adapters' gradients are averaged after each backward.
FSDP: torch's ``fully_shard`` per transformer block. The quantized layers' packed codes and constants become frozen
parameters so that FSDP shards them like any weight (1/N per process, all-gathered, in bytes, for the block being
computed). The adapters stay whole on every process, out of FSDP (``ignored_params``), and their gradients are
averaged in one all-reduce: they are about 1% of the model, and lowbit's 8-bit optimizers then run unchanged.

Each process takes its rows of the global batch; with equal-length sequences the mean of the processes' mean losses
is the single-process loss, and the averaged gradient is its gradient.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lowbit.nn import QuantLinear

PARALLEL = ("ddp", "fsdp")


@dataclass
class Processes:
    """This process's place among the ones torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    parallel: str = "ddp"

    @classmethod
    def from_env(cls, parallel: str = "ddp", timeout_s: float = 600) -> "Processes":
        """Join the process group torchrun's environment describes (gloo: CPUs), or a single process."""
        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, parallel)
        if not dist.is_initialized():
            # A process that dies makes its peers' next collective fail (gloo: connection closed); the timeout is
            # the backstop for one that hangs instead.
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), parallel)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This process's rows of a global batch of ``batch`` sequences."""
        if batch % self.world:
            raise ValueError(f"the batch ({batch}) must split evenly over {self.world} processes")
        n = batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of ``x`` over the processes."""
        if self.world == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x / self.world

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its mean over the processes (one flat all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value) -> list:
        """``value`` of every process, by rank."""
        if self.world == 1:
            return [value]
        seen = [None] * self.world
        dist.all_gather_object(seen, value)
        return seen

    def agree(self, value) -> None:
        """Raise unless every process holds the same ``value`` (a world size, a step to resume at)."""
        seen = self.gather(value)
        if any(v != seen[0] for v in seen):
            raise RuntimeError(f"the processes disagree: {seen}")

    def shard(self, model: nn.Module, trainable: list[nn.Parameter]) -> nn.Module:
        """With FSDP, shard the frozen base block by block (``trainable`` stay whole); with DDP, nothing to do."""
        if self.world == 1 or self.parallel != "fsdp":
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lowbit.calibrate.sequential import find_blocks

        frozen_as_parameters(model)
        mesh = init_device_mesh("cpu", (self.world,))
        ignored = set(trainable)
        _, blocks = find_blocks(model)
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        return model


def frozen_as_parameters(model: nn.Module) -> None:
    """Turn the quantized layers' stored tensors (buffers) into frozen parameters, which FSDP shards; scalars stay
    buffers. State-dict names do not change."""
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        for name, buf in list(module._buffers.items()):
            if buf is None or buf.dim() == 0 or name in module._non_persistent_buffers_set:
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(buf, requires_grad=False))


def held_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers this process holds (its shards only, under FSDP)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total
