"""Decoders of named sizes for training from scratch: LLaMA (the default) or Gemma3 (transformers' causal LMs built
from a config)."""
from __future__ import annotations

import torch

# Non-embedding parameters: 12 d^2-ish per layer (4 d^2 attention, 3 d f MLP). Tied input/output embedding.
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=5, num_attention_heads=4),    # 1.06M
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4),   # 4.82M
    "base": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8),   # 19.3M
}
# Gemma3 differs from LLaMA where LLM.int8 notices: the embedding is scaled by sqrt(hidden), every norm multiplies by
# (1 + w), the MLP's gate is tanh-GELU, q and k are RMS-normed, and blocks norm their outputs too. Heads as the
# LLaMA sizes have them (32 or 64 wide).
ARCHS = ("llama", "gemma3")


def model_config(size: str, vocab_size: int, max_seq: int, bos: int, eos: int, arch: str = "llama"):
    """The transformers config of a named size and architecture."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: one of {', '.join(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: one of {', '.join(ARCHS)}")
    dims = SIZES[size]
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


def build_model(size: str, vocab_size: int, max_seq: int, bos: int, eos: int, seed: int = 0, arch: str = "llama"):
    """A freshly initialised causal LM of ``size`` and ``arch`` (float32), seeded."""
    from transformers import AutoModelForCausalLM

    config = model_config(size, vocab_size, max_seq, bos, eos, arch)
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
