"""Rotate a model's residual stream by a random Hadamard matrix, folded into its weights (QuaRot, Ashkboos et al.,
2024; SpinQuant, Liu et al., 2024): the model computes the same function, but the inputs of its linear layers have
their outlier features spread over every dimension, so that every weight format rounds them with less error.

For a Llama-family model with residual stream x (d wide) and an orthogonal Q (d x d):
1. each RMSNorm's gain is folded into the layers that read its output (W <- W diag(g)), leaving a gain of 1: an
   RMSNorm without gain commutes with Q (||x Q|| = ||x||);
2. the embedding rows become E Q; every layer that reads the stream (q, k, v, gate, up, the head) W <- W Q; every
   layer that writes it (o, down) W <- Q^T W (and its bias b <- b Q).
The head then differs from the embedding (unless every final-norm gain is equal): a tied head is untied.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.nn.base import QuantLinear

ARCHS = ("llama", "mistral", "qwen2")


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)])
    jacobsthal = torch.stack([chi[(i - torch.arange(q)) % q] for i in range(q)])  # Q[i, j] = chi(i - j)
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return s + torch.eye(q + 1)


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I): Sylvester's for powers of two, Kronecker products
    with Paley's orders 12, 20 and 44 otherwise; None where neither builds one."""
    if n == 1:
        return torch.ones(1, 1)
    if n % 2 == 0 and n & (n - 1) == 0:
        h = hadamard(n // 2)
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    for order, q in ((12, 11), (20, 19), (44, 43)):
        if n % order == 0 and (rest := hadamard(n // order)) is not None:
            return torch.kron(_paley(q), rest)
    return None


def random_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal n x n matrix (float64): a Hadamard matrix with random column signs, / sqrt(n), where one of
    order n is known; else a uniformly random orthogonal matrix (QR of a Gaussian one)."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return h.double() * signs[None, :] / math.sqrt(n)


def _scale_inputs(layer: nn.Linear, gain: torch.Tensor) -> None:
    layer.weight.data = (layer.weight.data.double() * gain[None, :]).to(layer.weight.dtype)


def _rotate_inputs(layer: nn.Linear, q: torch.Tensor) -> None:
    layer.weight.data = (layer.weight.data.double() @ q).to(layer.weight.dtype)


def _rotate_outputs(layer: nn.Linear, q: torch.Tensor) -> None:
    layer.weight.data = (q.t() @ layer.weight.data.double()).to(layer.weight.dtype)
    if layer.bias is not None:
        layer.bias.data = (layer.bias.data.double() @ q).to(layer.bias.dtype)


@torch.no_grad()
def rotate(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fold a random Hadamard rotation into ``model``'s residual stream, in place; returns the model.

    The model must be a full-precision Llama, Mistral or Qwen2 (rotate before quantizing). Its logits stay those of
    the original up to float rounding (the products are taken in float64)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"rotation covers {', '.join(ARCHS)} models; this is {model_type!r}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model is already quantized: rotate the full-precision model, then quantize it")
    inner, head = model.model, model.lm_head
    d = config.hidden_size
    q = random_rotation(d, seed)
    if head.weight is inner.embed_tokens.weight:  # untie: the head takes the final norm's gain, the embedding not
        head.weight = nn.Parameter(head.weight.detach().clone())
    config.tie_word_embeddings = False
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        readers = {"input_layernorm": (attn.q_proj, attn.k_proj, attn.v_proj),
                   "post_attention_layernorm": (mlp.gate_proj, mlp.up_proj)}
        for norm_name, reads in readers.items():
            norm = getattr(layer, norm_name)
            gain = norm.weight.data.double()
            for lin in reads:
                _scale_inputs(lin, gain)
                _rotate_inputs(lin, q)
            norm.weight.data.fill_(1.0)
        _rotate_outputs(attn.o_proj, q)
        _rotate_outputs(mlp.down_proj, q)
    _scale_inputs(head, inner.norm.weight.data.double())
    _rotate_inputs(head, q)
    inner.norm.weight.data.fill_(1.0)
    emb = inner.embed_tokens.weight
    emb.data = (emb.data.double() @ q).to(emb.dtype)
    return model


__all__ = ["ARCHS", "hadamard", "random_rotation", "rotate"]
