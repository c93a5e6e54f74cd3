"""memory_report(model): bytes by layer type, bits/param, against fp32 and bf16 sizes."""
from __future__ import annotations

from collections import defaultdict

from torch import nn

from lowbit.nn import QuantLinear


def memory_report(model: nn.Module) -> dict:
    """Stored bytes by module type (shared tensors counted once), parameter count and bits/param."""
    seen: set[int] = set()
    by_type: dict[str, int] = defaultdict(int)
    params = 0
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if isinstance(module, QuantLinear) and own and all(t is None or t.data_ptr() in seen for _, t in own):
            continue  # a second module over the same tensors (a loaded head tied to quantized embeddings)
        for name, t in own:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            by_type[type(module).__name__] += t.numel() * t.element_size()
            if isinstance(module, QuantLinear):
                params += module.bias.numel() if name == "bias" else 0
            elif isinstance(t, nn.Parameter):
                params += t.numel()
        if isinstance(module, QuantLinear):
            params += module.in_features * module.out_features
    total = sum(by_type.values())
    return {
        "bytes_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "total_bytes": total,
        "parameters": params,
        "bits_per_param": total * 8 / params,
        "fp32_bytes": params * 4,
        "bf16_bytes": params * 2,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes (Linux's ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
