"""Decoders of named sizes for training from scratch: LLaMA (the default) or Gemma3 (transformers' causal LMs built
from a config)."""
from __future__ import annotations

import torch

# Non-embedding parameters: 12 d^2-ish per layer (4 d^2 attention, 3 d f MLP). Tied input/output embedding.
SIZES = {
    "micro": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=2),    # 0.21M
    "mini": dict(hidden_size=96, intermediate_size=288, num_hidden_layers=4, num_attention_heads=3),     # 0.48M
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=5, num_attention_heads=4),    # 1.06M
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4),   # 4.82M
    "base": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8),   # 19.3M
}
# Gemma3 differs from LLaMA where LLM.int8 notices: the embedding is scaled by sqrt(hidden), every norm multiplies by
# (1 + w), the MLP's gate is tanh-GELU, q and k are RMS-normed, and blocks norm their outputs too. Heads as the
# LLaMA sizes have them (32 or 64 wide).
ARCHS = ("llama", "gemma3")


def scaled_dims(size: str, width: float = 1.0) -> dict:
    """A named size's dimensions with hidden and MLP widths times ``width``; heads keep their width, so their count
    scales too (BitNet b1.58 Reloaded, 2024: small ternary models want about twice the hidden width)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: one of {', '.join(SIZES)}")
    dims = dict(SIZES[size])
    if width != 1.0:
        head = dims["hidden_size"] // dims["num_attention_heads"]
        heads = max(1, round(dims["num_attention_heads"] * width))
        dims.update(hidden_size=heads * head, num_attention_heads=heads,
                    intermediate_size=int(round(dims["intermediate_size"] * width / 16)) * 16)
    return dims


def model_config(size: str, vocab_size: int, max_seq: int, bos: int, eos: int, arch: str = "llama",
                 width: float = 1.0):
    """The transformers config of a named size (its widths times ``width``) and architecture."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: one of {', '.join(ARCHS)}")
    dims = scaled_dims(size, width)
    common = dict(vocab_size=vocab_size, max_position_embeddings=max_seq, tie_word_embeddings=True,
                  num_key_value_heads=dims["num_attention_heads"], bos_token_id=bos, eos_token_id=eos,
                  attention_bias=False, **dims)  # no pad_token_id: the embedding would freeze that row at zero
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        head_dim = dims["hidden_size"] // dims["num_attention_heads"]
        return Gemma3TextConfig(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=max_seq,
                                rms_norm_eps=1e-6, pad_token_id=None, **common)
    from transformers import LlamaConfig

    return LlamaConfig(rms_norm_eps=1e-5, mlp_bias=False, **common)


def build_model(size: str, vocab_size: int, max_seq: int, bos: int, eos: int, seed: int = 0, arch: str = "llama",
                width: float = 1.0):
    """A freshly initialised causal LM of ``size`` (widths times ``width``) and ``arch`` (float32), seeded."""
    from transformers import AutoModelForCausalLM

    config = model_config(size, vocab_size, max_seq, bos, eos, arch, width)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = eos
    return model


def non_embedding_params(model) -> int:
    """Parameters outside the (tied) token embedding and the output head."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def residual_dropout(model, p: float) -> None:
    """Dropout (rate ``p``, training only) on the attention probabilities and on the output of every block's
    attention and MLP before it joins the residual stream, as GPT-2 and OPT train; LLaMA's own config has only the
    first. Forward hooks: nothing is added to the saved model."""
    import torch.nn.functional as F

    def drop(module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):  # attention: (output, weights)
            return (F.dropout(output[0], p, True),) + output[1:]
        return F.dropout(output, p, True)

    model.config.attention_dropout = p
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)
