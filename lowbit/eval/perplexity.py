"""Perplexity of a causal LM on a text: non-overlapping windows (or a strided sliding window)."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm


@torch.no_grad()
def perplexity(model, tokenizer, text: str, tokens: int = 8192, window: int = 512, stride: int | None = None,
               progress: bool = True) -> float:
    """exp(mean NLL) over every predicted token of the first ``tokens`` tokens of ``text``.

    stride None: non-overlapping windows, each token predicted from the window start. stride < window:
    sliding windows; each scores only the tokens not scored before, with up to ``window`` tokens of context.
    """
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0][:tokens]
    if ids.numel() < 2:
        raise ValueError("the text is too short: fewer than 2 tokens")
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    nll, count, scored_to = 0.0, 0, 0
    starts = list(range(0, ids.numel() - 1, stride))
    for start in tqdm(starts, desc="perplexity", disable=None if progress else True, leave=False):
        end = min(start + window, ids.numel())
        chunk = ids[start:end].unsqueeze(0)
        logits = model(chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        # Score only targets past what earlier windows scored (all of them when not overlapping).
        first = max(scored_to - start - 1, 0)
        losses = torch.nn.functional.cross_entropy(logits[first:], targets[first:], reduction="sum")
        nll += float(losses)
        count += targets.numel() - first
        scored_to = end
        if end == ids.numel():
            break
    return math.exp(nll / count)
