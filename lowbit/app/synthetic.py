"""Random-config transformers models whose activations carry planted outlier features, for comparisons across
architectures where no trained weights can be downloaded.

Trained LLMs put their large activations in a few fixed feature dimensions (Dettmers et al., 2022: magnitudes up
to 20x the other dimensions'). A random model has none: its norms are all ones. ``outlier_model`` gives a few dimensions of every block's norm a gain of ``gain`` (e.g. 10-40), so each
linear layer that reads a normed input sees those columns at |x| >= 6 on most tokens, as LLM.int8's outlier
decomposition must handle; layers reading other inputs (o_proj, down_proj) keep the architecture's own statistics.
"""
from __future__ import annotations

import torch

from lowbit.nn.base import owner_of

# architecture -> (transformers config class, its extra fields). Small: 4 blocks of width 256.
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 64}),
    "gemma2": ("Gemma2Config", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 256}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 256}),
    "opt": ("OPTConfig", {}),
}


def outlier_model(arch: str, seed: int = 0, hidden: int = 256, layers: int = 4, vocab: int = 49152,
                  outlier_dims: int = 4, gain: tuple[float, float] = (10.0, 40.0)) -> torch.nn.Module:
    """A random ``arch`` causal LM (float32, eval mode) with ``outlier_dims`` feature dimensions whose norm gains
    are drawn from ``gain`` in every block (the same dimensions throughout, as in trained models)."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if not 0 <= outlier_dims <= hidden:
        raise ValueError(f"outlier_dims must be in 0..{hidden}, got {outlier_dims}")
    name, extra = ARCHITECTURES[arch]
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, vocab_size=vocab,
                  max_position_embeddings=2048)
    if arch == "opt":
        cfg = getattr(transformers, name)(ffn_dim=4 * hidden, word_embed_proj_dim=hidden, **common, **extra)
    else:
        cfg = getattr(transformers, name)(intermediate_size=4 * hidden, num_key_value_heads=2, **common, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    dims = torch.randperm(hidden, generator=g)[:outlier_dims]
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if module_name.rpartition(".")[2] not in _input_norms(model, module_name):
                continue
            # Gemma's norms multiply by (1 + weight), initialised at 0; the others by weight, initialised at 1.
            offset = 1.0 if float(module.weight.abs().mean()) < 0.5 else 0.0
            module.weight[dims] = torch.empty(outlier_dims).uniform_(*gain, generator=g) - offset
    model.outlier_dims = dims.tolist()
    return model


def _input_norms(model: torch.nn.Module, name: str) -> tuple[str, ...]:
    """The names, within the block holding ``name``, of the norms whose output a linear layer reads (Gemma2 / 3's
    post_attention_layernorm and post_feedforward_layernorm norm a block's outputs instead)."""
    block = owner_of(model, name)[0] if "layers." in name else None
    if block is None:
        return ()
    if hasattr(block, "pre_feedforward_layernorm"):
        return ("input_layernorm", "pre_feedforward_layernorm")
    return ("input_layernorm", "post_attention_layernorm", "self_attn_layer_norm", "final_layer_norm")
