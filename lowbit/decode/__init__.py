"""``lowbit.generate``: text generation on a lean decode loop, for models quantized by lowbit or not."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.decode.decoder import StaticDecoder, paused_gc, supports
from lowbit.decode.sampling import next_token
from lowbit.decode.threads import ThreadChooser


class HFDecoder:
    """The same interface as ``StaticDecoder`` over transformers' own forward and cache (any causal LM)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache = model, None

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()


def decoder_for(model: nn.Module, batch: int, max_len: int) -> StaticDecoder | HFDecoder:
    """lowbit's lean decoder where it runs the model's architecture, else transformers' forward."""
    return StaticDecoder(model, batch, max_len) if supports(model, max_len) is None else HFDecoder(model)


def _eos_ids(model: nn.Module, eos_token_id) -> set[int]:
    if eos_token_id is None:
        config = getattr(model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, generator: torch.Generator | None = None,
             threads: int | str | None = "auto") -> torch.Tensor:
    """input_ids [batch, T] followed by up to ``max_new_tokens`` generated tokens (greedy unless ``do_sample``).

    Stops when every sequence has produced an end token (the model's generation_config names it unless
    ``eos_token_id`` does); finished sequences are padded with their end token, as transformers does.
    ``threads``: "auto" (default) times decode steps on torch's thread count and on one thread and keeps the faster,
    looking again every 64 steps (``ThreadChooser``: with one of 2 cores busy, SmolLM2 NF4 decodes 50.5 tok/s
    against 20.2 on 2 threads); a number uses that many threads for this call; None keeps torch's count.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"generate: input_ids must be integer token ids [batch, T] with T >= 1, got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if threads is not None and threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int)
                                                      or threads < 1):
        raise ValueError(f"generate: threads must be a positive integer, 'auto' or None, got {threads!r}")
    if max_new_tokens == 0:
        return input_ids
    vocab = model.get_input_embeddings().num_embeddings
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        raise ValueError(f"generate: token ids must lie in [0, {vocab}), got "
                         f"{int(input_ids.min())}..{int(input_ids.max())}")
    was_training, saved_threads = model.training, torch.get_num_threads()
    model.eval()
    if isinstance(threads, int):
        torch.set_num_threads(threads)
    chooser = ThreadChooser() if threads == "auto" else None
    try:
        with paused_gc():
            eos = torch.tensor(sorted(_eos_ids(model, eos_token_id)), dtype=torch.long)
            ids = input_ids.long()
            decoder = decoder_for(model, ids.shape[0], ids.shape[1] + max_new_tokens)
            logits = decoder.forward(ids)
            out, done = [], torch.zeros(ids.shape[0], dtype=torch.bool)
            for step in range(max_new_tokens):
                token = next_token(logits, do_sample, temperature, top_k, top_p, generator)
                if eos.numel():
                    pad = out[-1] if out else token
                    token = torch.where(done, pad, token)
                    done |= torch.isin(token, eos)
                out.append(token)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                if chooser is not None:
                    chooser.before(step)
                logits = decoder.forward(token[:, None])
                if chooser is not None:
                    chooser.after(step)
            return torch.cat([ids, torch.stack(out, 1)], dim=1)
    finally:
        model.train(was_training)
        torch.set_num_threads(saved_threads)
