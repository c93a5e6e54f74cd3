"""Calibration data: token sequences from a text, disjoint from the evaluation windows, with a fixed seed."""
from __future__ import annotations

import torch


def calibration_batches(tokenizer, text: str, n_samples: int = 32, seq_len: int = 512, skip_tokens: int = 8192,
                        seed: int = 0) -> torch.Tensor:
    """[n_samples, seq_len] token ids from random offsets past the first ``skip_tokens`` tokens (the evaluation part)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0][skip_tokens:]
    if ids.numel() < seq_len + 1:
        raise ValueError(f"the text has {ids.numel()} tokens past the first {skip_tokens}; calibration needs at least {seq_len + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
