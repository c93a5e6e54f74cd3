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
def speed(model, prompt_tokens: int = 128, new_tokens: int = 16, repeats: int = 3, vocab: int | None = None,
          decoder: str = "lean", threads: str | None = None) -> dict:
    """Median prefill tokens/s over ``prompt_tokens`` and greedy decode tokens/s over ``new_tokens`` (and the
    median seconds of each), on the decode loop ``lowbit.generate`` uses: lowbit's lean decoder where it runs the
    architecture, else transformers' (``decoder="transformers"``: always transformers' forward and cache).
    ``threads="auto"`` chooses decode threads while decoding, as ``lowbit.generate`` does by default; None keeps
    torch's count."""
    from lowbit.decode import HFDecoder, ThreadChooser, decoder_for, paused_gc

    if decoder not in ("lean", "transformers") or threads not in (None, "auto"):
        raise ValueError(f"speed: decoder must be 'lean' or 'transformers' and threads None or 'auto', got "
                         f"{decoder!r}, {threads!r}")
    make = (lambda n: HFDecoder(model)) if decoder == "transformers" else (lambda n: decoder_for(model, 1, n))
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    make(8).forward(ids[:, :8])  # warm-up: first-call allocations and lazy initialisation
    most = torch.get_num_threads()
    prefill, decode = [], []
    for _ in range(repeats):
        dec = make(prompt_tokens + new_tokens)
        t = time.perf_counter()
        logits = dec.forward(ids)
        prefill.append(time.perf_counter() - t)
        chooser = ThreadChooser() if threads == "auto" else None
        t = time.perf_counter()
        with paused_gc():  # as lowbit.generate decodes
            for step in range(new_tokens):
                if chooser:
                    chooser.before(step)
                logits = dec.forward(logits.argmax(-1)[:, None])
                if chooser:
                    chooser.after(step)
        decode.append(time.perf_counter() - t)
        torch.set_num_threads(most)
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    return {"prefill_tok_s": prompt_tokens / prefill_s, "decode_tok_s": new_tokens / decode_s,
            "prefill_s": prefill_s, "decode_s": decode_s, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "decoder": type(dec).__name__}
