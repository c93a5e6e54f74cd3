"""``lowbit.generate``: text generation on a lean decode loop, for models quantized by lowbit or not."""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import nn

from lowbit.decode.decoder import StaticDecoder, paused_gc, supports
from lowbit.decode.sampling import next_token
from lowbit.decode.threads import ThreadChooser


class HFDecoder:
    """The same interface as ``StaticDecoder`` over transformers' own forward and cache (any causal LM)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache, self.pos = model, None, 0
        self.mask: torch.Tensor | None = None  # [batch, pos] once a call had padding: 1 token, 0 padding

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, vocab] of the last of ``ids`` [batch, T]; ``attention_mask`` as ``StaticDecoder``'s."""
        if self.mask is None and attention_mask is not None and not bool(attention_mask.all()):
            self.mask = torch.ones(ids.shape[0], self.pos, dtype=torch.long, device=ids.device)
        self.pos += ids.shape[1]
        if self.mask is None:
            out = self.model(ids, past_key_values=self.cache, use_cache=True)
        else:
            new = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
            self.mask = torch.cat([self.mask, new], dim=1)
            # Positions count each row's real tokens, as transformers' generate gives them; padding's do not matter.
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            out = self.model(ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache,
                             use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()


def decoder_for(model: nn.Module, batch: int, max_len: int) -> StaticDecoder | HFDecoder:
    """lowbit's lean decoder where it runs the model's architecture, else transformers' forward."""
    return StaticDecoder(model, batch, max_len) if supports(model, max_len) is None else HFDecoder(model)


def decode_path(model: nn.Module) -> str:
    """One line: which decode step ``lowbit.generate`` runs for one sequence of ``model``, and why not a faster one."""
    why = supports(model, 16)
    if why is not None:
        return f"transformers' forward ({why})"
    decoder = StaticDecoder(model, 1, 16)
    if decoder.native is None:
        return f"lowbit's Python step (no native step: {decoder.native_why})"
    n = decoder.native.int8_weights
    return f"lowbit's native step ({f'int8 activations for {n} 4-bit weights' if n else 'float32 activations'})"


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _eos_ids(model: nn.Module, eos_token_id) -> set[int]:
    if eos_token_id is None:
        config = getattr(model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if _is_int(eos_token_id) else {int(i) for i in eos_token_id}


def _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id) -> None:
    # Checked up front: a float count fails deep in the decoder, a NaN temperature or top_p=0 as torch's
    # "probability tensor contains inf, nan", and top_p=2 or top_k=-5 would pass silently.
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"generate: do_sample must be True or False, got {do_sample!r}")
    if do_sample and not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"generate: temperature must be a finite number > 0 when sampling (do_sample=False for "
                         f"greedy), got {temperature!r}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"generate: top_k must be an int >= 1, or None for no limit (transformers' top_k=0), got "
                         f"{top_k!r}")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be a number in (0, 1], or None for no limit, got {top_p!r} "
                         f"(transformers' top_p=0 keeps only the most likely token: top_k=1 does that)")
    eos = [eos_token_id] if _is_int(eos_token_id) else eos_token_id
    if eos_token_id is not None and not (isinstance(eos, (list, tuple)) and all(_is_int(i) and i >= 0 for i in eos)):
        raise ValueError(f"generate: eos_token_id must be an int >= 0, a list of them or None, got {eos_token_id!r}")


def _check_mask(attention_mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    """``attention_mask`` checked against ``ids`` [batch, T], as bool; None where it masks nothing."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"generate: attention_mask must be a tensor, got {type(attention_mask).__name__}")
    mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
    if mask.shape != ids.shape:
        raise ValueError(f"generate: attention_mask must have input_ids' shape {tuple(ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("generate: attention_mask must hold only 1 (token) and 0 (padding)")
    mask = mask.bool()
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"generate: every row of attention_mask needs a 1 (a token); rows {empty} have none")
    return None if bool(mask.all()) else mask


def _left_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` and ``mask`` with each row's tokens moved, in order, to its right end and the padding before them."""
    order = mask.long().argsort(dim=1, stable=True)  # padding (0) first, each group in its own order
    return ids.gather(1, order), mask.gather(1, order)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, generator: torch.Generator | None = None,
             threads: int | str | None = "auto", attention_mask: torch.Tensor | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """input_ids [batch, T] followed by up to ``max_new_tokens`` generated tokens (greedy unless ``do_sample``).

    Stops when every sequence has produced an end token (the model's generation_config names it unless
    ``eos_token_id`` does); finished sequences are padded with their end token, as transformers does.
    ``top_k`` (an int >= 1) and ``top_p`` (in (0, 1]) limit sampling; None for no limit.
    ``attention_mask`` [batch, T] (1: token, 0: padding, as a tokenizer gives it, padded left or right) makes each
    row continue as its unpadded tokens alone would. The result is [batch, T + new] whatever the padding side:
    ``out[:, :T]`` is input_ids as given, ``out[:, T:]`` each row's new tokens.
    ``on_token`` is called with each step's new tokens [batch] as soon as they are chosen (to stream them).
    ``threads``: "auto" (default) times decode steps on torch's thread count and on one thread and keeps the faster,
    looking again every 64 steps (``ThreadChooser``: with one of 2 cores busy, SmolLM2 NF4 decodes 50.5 tok/s
    against 20.2 on 2 threads); a number uses that many threads for this call; None keeps torch's count.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"generate: input_ids must be a tensor of token ids, got {type(input_ids).__name__} "
                         "(torch.tensor(ids) makes one)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or 0 in input_ids.shape or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"generate: input_ids must be integer token ids [batch, T] with batch, T >= 1, got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}")
    mask = _check_mask(attention_mask, input_ids)
    if on_token is not None and not callable(on_token):
        raise ValueError(f"generate: on_token must be a function of the new tokens, got {type(on_token).__name__}")
    _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id)
    if threads is not None and threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int)
                                                      or threads < 1):
        raise ValueError(f"generate: threads must be a positive integer, 'auto' or None, got {threads!r}")
    if max_new_tokens == 0:
        return input_ids
    # The decoder's cache holds every position up front: a length past what the model was made for would only
    # allocate (a 10**9 request asked for 32 GB) before it failed or generated noise.
    longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if _is_int(longest) and input_ids.shape[1] + max_new_tokens > longest:
        raise ValueError(f"generate: {input_ids.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
                         f"{longest} positions this model takes (config.max_position_embeddings)")
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
            if mask is None:
                logits = decoder.forward(ids)
            else:  # left padding for every row: each row's last column is then its last token
                logits = decoder.forward(*_left_aligned(ids, mask))
            out, done = [], torch.zeros(ids.shape[0], dtype=torch.bool)
            for step in range(max_new_tokens):
                token = next_token(logits, do_sample, temperature, top_k, top_p, generator)
                if eos.numel():
                    pad = out[-1] if out else token
                    token = torch.where(done, pad, token)
                    done |= torch.isin(token, eos)
                out.append(token)
                if on_token is not None:
                    on_token(token)
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
