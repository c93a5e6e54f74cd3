"""Prefill and decode speed of a causal LM in tokens/s, and a line that names the machine they ran on."""
from __future__ import annotations

import statistics
import time

import torch


def machine() -> str:
    """CPU model and the features that choose paths, threads, torch version, the kernel paths in use: what a
    speed figure is worth."""
    from lowbit import kernels
    from lowbit.kernels import cpu

    return f"{cpu.describe()}; {torch.get_num_threads()} threads, torch {torch.__version__}; {kernels.describe()}"


@torch.no_grad()
def speed(model, prompt_tokens: int = 128, new_tokens: int = 16, repeats: int = 3, vocab: int | None = None) -> dict:
    """Median prefill tokens/s over ``prompt_tokens`` and greedy decode tokens/s over ``new_tokens``, on the decode
    loop ``lowbit.generate`` uses (lowbit's lean decoder where it runs the architecture, else transformers')."""
    from lowbit.decode import decoder_for, paused_gc

    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    decoder_for(model, 1, 8).forward(ids[:, :8])  # warm-up: first-call allocations and lazy initialisation
    prefill, decode = [], []
    for _ in range(repeats):
        decoder = decoder_for(model, 1, prompt_tokens + new_tokens)
        t = time.perf_counter()
        logits = decoder.forward(ids)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        with paused_gc():  # as lowbit.generate decodes
            for _ in range(new_tokens):
                logits = decoder.forward(logits.argmax(-1)[:, None])
        decode.append(time.perf_counter() - t)
    return {"prefill_tok_s": prompt_tokens / statistics.median(prefill),
            "decode_tok_s": new_tokens / statistics.median(decode),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "decoder": type(decoder).__name__}
