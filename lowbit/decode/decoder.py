"""A lean forward pass for transformers' Llama-family decoders: a static KV cache and no per-call bookkeeping.

transformers' generate spends most of a small model's decode step outside the weights (cache objects, masks,
kwargs plumbing, module hooks: 41 of the 54 ms a token of SmolLM2-135M in fp32, against 4 of 17 here, 2 threads;
docs/speed.md). This runs the same arithmetic on the model's own modules (embedding, norms' weights, linear
layers, rotary embedding), so any lowbit layer, or a plain nn.Linear, serves as it is; a preallocated cache takes
each step's keys and values in place.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.decode.native import native_step
from lowbit.kernels import fast, fast_prefill
from lowbit.kernels.matmul import cpu_kernels, few_rows_call, few_rows_many

# Architectures whose decoder layer is: RMSNorm, q/k/v (biases allowed; Phi3's in one fused weight), RoPE, causal
# attention with grouped kv heads, o, RMSNorm, gated MLP (Phi3's gate and up fused). Gemma differs in its norms'
# gain (1 + w) and its scaled embeddings (its embedding module scales them). Others (q/k norms, sliding windows,
# soft-capping...) run through transformers.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM", "Phi3ForCausalLM")
_WINDOWED = ("MistralForCausalLM", "Phi3ForCausalLM")  # a sliding window whenever the config names one


@dataclass
class Norm:
    """An RMSNorm as the model applies it: ``gain`` (Gemma's 1 + w, made once in float32), its epsilon, and whether
    the gain multiplies in float32 before the cast back (Gemma) or after it (Llama)."""

    gain: torch.Tensor
    eps: float
    gain_in_float: bool = False

    @classmethod
    def of(cls, module: nn.Module, gemma: bool) -> "Norm":
        eps = getattr(module, "variance_epsilon", None) or module.eps
        return cls((1.0 + module.weight.float()) if gemma else module.weight, eps, gemma)


@dataclass
class LayerParts:
    """A decoder layer's pieces: q/k/v as one fused module or three, o, gate/up as one fused module (gate rows
    first) or two, down, the norms before attention and before the MLP."""

    qkv: tuple[nn.Module, ...]
    o: nn.Module
    gate_up: tuple[nn.Module, ...]
    down: nn.Module
    norm1: Norm
    norm2: Norm
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


def layer_parts(model: nn.Module) -> list[LayerParts]:
    """The pieces of each decoder layer of a model ``supports`` accepts."""
    gemma = type(model).__name__ == "GemmaForCausalLM"
    parts = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv = (a.qkv_proj,) if hasattr(a, "qkv_proj") else (a.q_proj, a.k_proj, a.v_proj)
        gate_up = (m.gate_up_proj,) if hasattr(m, "gate_up_proj") else (m.gate_proj, m.up_proj)
        act = getattr(m, "act_fn", None) or m.activation_fn
        parts.append(LayerParts(qkv, a.o_proj, gate_up, m.down_proj, Norm.of(layer.input_layernorm, gemma),
                                Norm.of(layer.post_attention_layernorm, gemma), act, a.scaling))
    return parts


@contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off for a decode loop (reference counting still frees every tensor): each
    step makes hundreds of tensor objects, and the collections they set off took 2.8% of the samples of a SmolLM2
    NF4 decode (perf, CPU C)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def supports(model: nn.Module, max_len: int | None = None) -> str | None:
    """None if ``StaticDecoder`` runs ``model`` (for sequences up to ``max_len``), else why not (one line)."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"{name} is not one of {', '.join(ARCHITECTURES)}"
    config = model.config
    # A sliding window changes nothing while the whole sequence fits in it.
    window = getattr(config, "sliding_window", None)
    windowed = getattr(config, "use_sliding_window", name in _WINDOWED) and window is not None
    if windowed and (max_len is None or max_len > window):
        return f"sliding-window attention over {window} positions"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "the model has forward hooks (offloading or adapters with hooks)"
    if any(getattr(layer.self_attn, "q_norm", None) is not None for layer in model.model.layers):
        return "q/k norms"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        return "rotary embeddings over part of each head"
    # These pick their frequencies from the sequence's length: one table made up front would not match.
    original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if rope.get("rope_type") in ("dynamic", "longrope") and (max_len is None or original is None or max_len > original):
        return f"{rope.get('rope_type')} rotary embeddings past {original} positions"
    return None


def _call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # A lowbit layer's decode call (its kernel bound once), a float32 nn.Linear on lowbit's GEMV, else forward
    # itself without nn.Module.__call__ (hooks are ruled out by supports()).
    bound = getattr(module, "decode_call", None)
    if callable(bound):
        return bound()
    if isinstance(module, nn.Linear):
        return _dense_call(module)
    return module.forward


def _dense_call(module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    # torch's GEMV reads a row-major float32 weight at about half the bandwidth; lowbit's reads it at full speed
    # (SmolLM2's 113 MB tied head: 9.1 ms against 3.2 at 2 threads). Same sums in another order: float rounding.
    weight = module.weight
    ext = cpu_kernels(weight)
    if ext is None or weight.dtype != torch.float32 or not weight.is_contiguous():
        return module.forward
    return few_rows_call(lambda x2: ext.float_gemv(x2, weight), weight.shape[1], weight.shape[0], module.bias,
                         module.forward)


def _group(modules: tuple[nn.Module, ...]) -> Callable[[torch.Tensor], list]:
    # q, k and v (or gate and up) read one input: where each is a lowbit LUT layer with a decode plan, one kernel
    # call computes all of them, the same sums as their own calls, in one parallel region instead of several.
    # Other inputs take each layer's forward, as the layers' own decode calls do.
    plans = [getattr(m, "decode_plan", lambda: None)() for m in modules]
    if len(modules) > 1 and all(p is not None for p in plans):
        biases = [None if m.bias is None else m.bias.float() for m in modules]
        return few_rows_many(fast(), plans, modules[0].in_features, biases, [m.forward for m in modules])
    calls = [_call(m) for m in modules]
    return lambda h: [c(h) for c in calls]


class StaticDecoder:
    """Prefill and one-token steps over ``model`` with a KV cache of ``max_len`` positions per sequence."""

    def __init__(self, model: nn.Module, batch: int, max_len: int) -> None:
        why = supports(model, max_len)
        if why is not None:
            raise ValueError(f"StaticDecoder: {why}")
        config, inner = model.config, model.model
        self.model_name = type(model).__name__
        self.max_len, self.pos = max_len, 0
        # Set by the first padded call: which cached positions hold real tokens, and each row's real-token count
        # (its next RoPE position). None keeps every row's positions 0, 1, 2... and no key mask.
        self.real: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embed, self.head = inner.embed_tokens, _call(model.lm_head)
        self.final_norm = Norm.of(inner.norm, self.model_name == "GemmaForCausalLM")
        p = next(model.parameters())
        self.dtype = getattr(inner.embed_tokens, "compute_dtype", None) or inner.embed_tokens.weight.dtype
        positions = torch.arange(max_len, device=p.device)[None]
        cos, sin = inner.rotary_emb(torch.empty(0, dtype=self.dtype, device=p.device), positions)
        # transformers rotates by x * cos + cat(-x2, x1) * sin; cat(x2, x1) is x rolled by half, and the sign moves
        # onto sin exactly (negation is exact): one roll and no negation per step.
        half = self.head_dim // 2
        self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # [max_len, head_dim]
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.config, self.lm_head, self.hidden = config, model.lm_head, config.hidden_size
        self.parts = layer_parts(model)
        self.intermediate = self.parts[0].down.in_features
        self.q_rows, self.kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.blocks = []
        for parts in self.parts:
            # Each layer's bound calls and cache (its norms, activation and scale stay in self.parts).
            self.blocks.append(dict(
                qkv=_group(parts.qkv), o=_call(parts.o), gate_up=_group(parts.gate_up), down=_call(parts.down),
                k_cache=torch.zeros(shape, dtype=self.dtype, device=p.device),
                v_cache=torch.zeros(shape, dtype=self.dtype, device=p.device)))
        # One sequence, one token at a time: the native step where it runs this model (else None, and why).
        self.native, self.native_why = (None, "batches of several sequences") if batch > 1 else native_step(self)

    @staticmethod
    def _norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
        # transformers' RMSNorm: in float32, then the gain in the input's dtype (Gemma: the gain in float32 first)
        if x.dtype == torch.float32:  # the same arithmetic in one fused op
            return F.rms_norm(x, norm.gain.shape, norm.gain, norm.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
        return (h * norm.gain).to(x.dtype) if norm.gain_in_float else norm.gain * h.to(x.dtype)

    def _split(self, outs: list[torch.Tensor], sizes: tuple[int, ...]) -> list[torch.Tensor]:
        # a fused weight's output (Phi3's qkv_proj, gate_up_proj) cut into its parts
        return outs if len(outs) == len(sizes) else list(outs[0].split(sizes, dim=-1))

    def _padded(self, real: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos and sin [batch, 1, t, head_dim] at each row's own positions, and the attention mask [batch, 1, t, end]
        (True: attend) of a call whose tokens ``real`` [batch, t] marks (False: padding)."""
        self.real[:, start:end] = real
        # Each row counts its real tokens only; padding repeats the position before it (no real token sees it).
        positions = (self.seen[:, None] + real.cumsum(-1) - 1).clamp(min=0)
        self.seen = self.seen + real.sum(-1)
        query = torch.arange(start, end, device=real.device)[:, None]
        key = torch.arange(end, device=real.device)[None]
        # Padded keys are hidden, but a padded query still sees itself: a softmax row of only -inf is NaN, which
        # would reach the real rows through 0 * NaN in the values product.
        mask = (key <= query) & (self.real[:, None, :end] | (key == query))
        return self.cos[positions][:, None], self.sin[positions][:, None], mask[:, None]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, vocab] of the last of ``ids`` [batch, T] given everything decoded before them.

        ``attention_mask`` [batch, T] (1: token, 0: padding) hides padding from every later token and leaves it out
        of the positions: each row's tokens take RoPE positions 0, 1, 2... counting its own real tokens. The last
        column must be real in every row (left padding) for its logits to mean anything."""
        b, t = ids.shape
        start, end = self.pos, self.pos + t
        if end > self.max_len:
            raise ValueError(f"StaticDecoder: {end} positions exceed the cache's {self.max_len}")
        if self.real is None and attention_mask is not None and not bool(attention_mask.all()):
            # The first padding: every position cached so far was a real token.
            self.real = torch.ones(b, self.max_len, dtype=torch.bool, device=ids.device)
            self.seen = torch.full((b,), start, dtype=torch.long, device=ids.device)
        if self.real is not None:
            real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            cos, sin, mask = self._padded(real, start, end)
            causal = False
        else:
            cos, sin = self.cos[start:end], self.sin[start:end]
            # Prefill from an empty cache is plainly causal; one step attends to every cached position; several
            # tokens after a filled cache each see the cache and the new tokens up to themselves.
            causal, mask = start == 0 and t > 1, None
            if start > 0 and t > 1:
                key, query = torch.arange(end, device=ids.device), torch.arange(start, end, device=ids.device)
                mask = key[None] <= query[:, None]
        x = self.embed(ids)
        if self.native is not None and t == 1 and self.real is None:
            self.pos = end
            return self.native(x.reshape(-1), start)
        # The prompt (several tokens into an empty cache) multiplies in bf16 where lowbit.kernels.prefill_path() says
        # so; later calls of several tokens stay float32.
        with fast_prefill() if t > 1 and start == 0 else nullcontext():
            for parts, blk in zip(self.parts, self.blocks):
                h = self._norm(x, parts.norm1)
                q, k, v = self._split(blk["qkv"](h), (self.q_rows, self.kv_rows, self.kv_rows))
                q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
                k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
                v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
                qk = torch.cat((q, k), dim=1)  # queries and keys rotated together
                qk = qk * cos + qk.roll(self.head_dim // 2, -1) * sin
                q, k = qk[:, :self.heads], qk[:, self.heads:]
                blk["k_cache"][:, :, start:end] = k
                blk["v_cache"][:, :, start:end] = v
                keys, values = blk["k_cache"][:, :, :end], blk["v_cache"][:, :, :end]
                # One float32 query per kv head group: three small matmuls beat SDPA's kernel setup (33 us a call).
                if t == 1 and x.dtype == torch.float32:
                    scores = q.reshape(b, self.kv_heads, -1, self.head_dim) @ keys.transpose(2, 3) * parts.scaling
                    if mask is not None:  # padding cached: [b, 1, 1, end] over [b, kv heads, group, end]
                        scores = scores.masked_fill(~mask, float("-inf"))
                    attn = (scores.softmax(-1) @ values).view(b, self.heads, 1, self.head_dim)
                else:
                    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                                          scale=parts.scaling, enable_gqa=self.heads != self.kv_heads)
                x = x + blk["o"](attn.transpose(1, 2).reshape(b, t, -1))
                h = self._norm(x, parts.norm2)
                gate, up = self._split(blk["gate_up"](h), (parts.down.in_features,) * 2)
                x = x + blk["down"](parts.act(gate) * up)
        self.pos = end
        return self.head(self._norm(x[:, -1:], self.final_norm))[:, -1].float()
