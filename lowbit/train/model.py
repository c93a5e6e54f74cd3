"""LLaMA-style decoders of named sizes for training from scratch (transformers' LlamaForCausalLM from a config)."""
from __future__ import annotations

import torch

# Non-embedding parameters: 12 d^2-ish per layer (4 d^2 attention, 3 d f MLP). Tied input/output embedding.
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=5, num_attention_heads=4),    # 1.06M
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4),   # 4.82M
    "base": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8),   # 19.3M
}


def llama_config(size: str, vocab_size: int, max_seq: int, bos: int, eos: int):
    """The transformers LlamaConfig of a named size."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: one of {', '.join(SIZES)}")
    dims = SIZES[size]
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_seq, tie_word_embeddings=True,
                       num_key_value_heads=dims["num_attention_heads"], rms_norm_eps=1e-5, bos_token_id=bos,
                       eos_token_id=eos, attention_bias=False, mlp_bias=False, **dims)


def build_model(size: str, vocab_size: int, max_seq: int, bos: int, eos: int, seed: int = 0):
    """A freshly initialised LlamaForCausalLM of ``size`` (float32), seeded."""
    from transformers import LlamaForCausalLM

    config = llama_config(size, vocab_size, max_seq, bos, eos)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
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
