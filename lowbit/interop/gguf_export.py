"""Write a model (full precision or quantized by lowbit) as a GGUF file that llama.cpp runs.

Linear weights go out as their layer holds them where it can: a BlockLinear (``lowbit.quantize(model, "q4_0")``,
GPTQ onto a block type, a per-tensor mix from a plan) is written in its own type and bytes, and an IntLinear that
holds the chosen format exactly (a model loaded with ``lowbit.interop.gguf.load_gguf``, or int4 / int8 with groups
of 32) from its own codes, bit for bit. Any other weight is dequantized to float32 and rounded onto the chosen type
by ggml's reference rounding (lowbit/formats/ggml.py; the same bytes as the ``gguf`` package's). Embeddings and the
LM head go out as Q8_0 (F32 / F16 for ``f32`` / ``f16``), norms as F32, as llama.cpp's converter does.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.formats import ggml, kquants
from lowbit.interop.gguf import GGUFError, read
from lowbit.nn import BitLinear, BlockLinear, IntLinear, QuantLinear
from lowbit.nn.base import check_plain_linear, is_linear_like, linear_weight
from lowbit.nn.ggml import K_FALLBACK, rows_type

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_k", "q6_k", "tq2_0")
# transformers model_type -> (llama.cpp architecture, whether llama.cpp's converter permutes q/k rows for rotary)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def _permute(rows: int, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q / k of llama models (pairs of rotary halves interleaved)."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).view(np.uint8).reshape(*x.shape, 2)


def _blocks_from_codes(layer: IntLinear, qtype: str, order: np.ndarray) -> np.ndarray | None:
    """The layer's own codes as GGUF blocks [rows, bytes], where its format is exactly ``qtype``; else None."""
    if layer.group_size != 32 or layer.in_features % 32:
        return None
    codes = layer.codes().numpy()[order].reshape(layer.out_features, -1, 32)
    scale = layer.weight_scale.numpy()[order]
    zero = layer.weight_zero.numpy()[order]
    if qtype == "q8_0" and layer.bits == 8 and layer.zero_dtype == "uint8" and (zero == 128).all():
        q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([_f16(scale), q], axis=-1).reshape(layer.out_features, -1)
    if layer.bits != 4:
        return None
    packed = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)  # ggml: weights j and j + 16 share byte j
    if qtype == "q4_0" and layer.zero_dtype == "uint8" and (zero == 8).all():
        return np.concatenate([_f16(scale), packed], axis=-1).reshape(layer.out_features, -1)
    if qtype == "q4_1" and layer.zero_dtype == "float32":
        m = -zero.astype(np.float32) * scale.astype(np.float32)  # w = (q - zero) * d = q * d + m
        return np.concatenate([_f16(scale), _f16(m), packed], axis=-1).reshape(layer.out_features, -1)
    return None


def _block(qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[getattr(GGMLQuantizationType, qtype.upper())][0]


def _kind(qtype: str):
    from gguf import GGMLQuantizationType

    return getattr(GGMLQuantizationType, qtype.upper())


def _quantize(w: np.ndarray, qtype: str) -> tuple[np.ndarray, "object"]:
    from gguf import quantize

    kind = _kind(qtype)
    if qtype == "f32":
        return np.ascontiguousarray(w, dtype=np.float32), kind
    if qtype == "f16":
        return np.ascontiguousarray(w, dtype=np.float16), kind
    block = _block(qtype)
    if w.shape[-1] % block:
        raise GGUFError(f"{qtype} takes rows whose length is a multiple of {block}; a weight here has rows of "
                        f"{w.shape[-1]}")
    if qtype in ggml.TYPES:
        blocks = ggml.reference(ggml.block_type(qtype), torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        return ggml.pack(blocks).numpy(), kind
    if qtype in kquants.TYPES:  # the gguf package does not quantize K types: lowbit's weighted search (weights w^2)
        blocks = kquants.search(kquants.TYPES[qtype], torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        return kquants.pack(blocks).numpy(), kind
    return quantize(np.ascontiguousarray(w, dtype=np.float32), kind), kind


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, QuantLinear) else linear_weight(module).shape[1]


def _is_ternary(module: nn.Module) -> bool:
    if isinstance(module, BitLinear):
        return True
    w = linear_weight(module).float() if not isinstance(module, QuantLinear) else module.dequantize().float()
    return torch.unique(w.abs()).numel() <= 2  # {0, s}: ternary times one scale


def export_gguf(model: nn.Module, tokenizer, path: str | Path, qtype: str = "q4_0", force_ternary: bool = False,
                tokenizer_gguf: str | Path | None = None, progress: bool = True) -> dict:
    """Write ``model`` to ``path`` as GGUF of ``qtype`` (one of TYPES); returns what was written how.

    The tokenizer's GGUF fields are copied from ``tokenizer_gguf`` (or the GGUF the model was loaded from) when
    given, else made from a transformers BPE tokenizer."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, MODEL_ARCH_NAMES, get_tensor_name_map
    from tqdm import tqdm

    if qtype not in TYPES:
        raise GGUFError(f"unknown GGUF type {qtype!r}; choose from {', '.join(TYPES)}")
    path = Path(path)
    if path.exists():
        raise GGUFError(f"{path} exists: choose a new file name")
    if not path.parent.is_dir():
        raise GGUFError(f"{path.parent} is not a folder")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise GGUFError(f"GGUF export covers {', '.join(ARCHS)} models; this is {model_type!r}")
    arch, permute_qk = ARCHS[model_type]
    linears = [(n, m) for n, m in model.named_modules() if is_linear_like(m) or isinstance(m, QuantLinear)]
    for n, m in linears:
        try:
            check_plain_linear(m, n)
        except ValueError as e:
            raise GGUFError(f"{e}; GGUF's llama graph has no such norm") from None
    if qtype == "tq2_0" and not force_ternary:
        # Only weights TQ2_0's blocks of 256 tile are written ternary; the others go out in Q8_0 as they are.
        not_ternary = [n for n, m in linears if not n.endswith("lm_head") and _in_features(m) % 256 == 0
                       and not isinstance(m, BlockLinear) and not _is_ternary(m)]
        if not_ternary:
            raise GGUFError(f"tq2_0 holds ternary weights; {len(not_ternary)} layer(s) are not ternary (e.g. "
                            f"{not_ternary[0]}): quantize with --method ternary first, or pass --force-ternary to "
                            "round them to ternary (a large loss)")
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, config.num_hidden_layers)

    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(tmp, arch)
    writer.add_name(getattr(config, "_name_or_path", "") or type(model).__name__)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    # A mixed file (a plan's BlockLinear layers) is labelled by --type, the type of the weights the plan left.
    file_type = {"f32": "ALL_F32", "q4_k": "MOSTLY_Q4_K_S"}.get(qtype, f"MOSTLY_{qtype.upper()}")
    writer.add_file_type(getattr(LlamaFileType, file_type))
    writer.add_quantization_version(2)
    source = tokenizer_gguf or ((getattr(model, "gguf_source", None) or {}).get("path"))
    _add_tokenizer(writer, tokenizer, source)

    report = {"type": qtype, "from_codes": 0, "quantized": 0, "float": 0, "tensors": 0}
    modules = dict(model.named_modules())
    for hf, tensor in tqdm(_named_tensors(model), desc="writing GGUF", disable=None if progress else True, leave=False,
                           total=_count_tensors(model)):
        owner, _, suffix = hf.rpartition(".")
        gguf_name = names.get_name(owner)
        if gguf_name is None:
            raise GGUFError(f"no GGUF name for {hf} in llama.cpp's {arch} architecture")
        gguf_name += "." + suffix
        module = modules.get(owner)
        rows = tensor.shape[0]
        order = np.arange(rows)
        if permute_qk and suffix in ("weight", "bias") and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            order = _permute(rows, n_head if "attn_q" in gguf_name else n_kv)
        is_linear = suffix == "weight" and module is not None and (is_linear_like(module) or isinstance(module, QuantLinear))
        embedding = gguf_name.startswith(("token_embd", "output.")) and suffix == "weight"
        if isinstance(module, BlockLinear) and suffix == "weight":  # its own type and bytes, whatever --type says
            blocks, kind = tensor.numpy()[order], _kind(module.block_type)
            report["from_codes"] += 1
            if module.block_type != qtype:
                report.setdefault("types", {}).setdefault(module.block_type, 0)
                report["types"][module.block_type] += 1
        elif is_linear and not embedding and tensor.dim() == 2:
            blocks = _blocks_from_codes(module, qtype, order) if isinstance(module, IntLinear) else None
            if blocks is not None:
                kind = getattr(GGMLQuantizationType, qtype.upper())
                report["from_codes"] += 1
            else:
                w = tensor.float().numpy()[order]
                fits = qtype in ("f32", "f16") or w.shape[-1] % _block(qtype) == 0
                # As llama.cpp's quantizer does, a weight whose rows the type's blocks do not tile goes out in its
                # fallback type: Q5_0 for Q4_K, Q8_0 for the others (blocks of 32), else F16.
                fallback = rows_type(qtype, w.shape[-1]) if qtype in K_FALLBACK else "q8_0"
                fallback = fallback if w.shape[-1] % 32 == 0 else "f16"
                blocks, kind = _quantize(w, qtype if fits else fallback)
                report["quantized"] += 1
                if not fits:
                    report.setdefault("fallback", []).append(f"{hf} ({fallback})")
        elif embedding:
            w = tensor.float().numpy()[order]
            blocks, kind = _quantize(w, qtype if qtype in ("f32", "f16") else "q8_0")
            report["quantized"] += 1
        else:  # norms, biases
            blocks, kind = _quantize(tensor.float().numpy()[order] if tensor.dim() else tensor.float().numpy(), "f32")
            report["float"] += 1
        writer.add_tensor(gguf_name, blocks, raw_dtype=kind)
        report["tensors"] += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report["bytes"] = path.stat().st_size
    return report


def _named_tensors(model: nn.Module):
    """Yield (transformers name, float tensor [out, in] for weights) one at a time, lowbit layers dequantized as they
    come (a whole dequantized model never exists), a BlockLinear's weight as its GGUF bytes [out, bytes a row]; the
    LM head is left out when it is the embedding (GGUF ties by leaving out output.weight)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            if isinstance(module, BlockLinear):
                yield f"{name}.weight", module.weight_blocks
                if module.bias is not None:
                    yield f"{name}.bias", module.bias.detach()
                continue
            yield f"{name}.weight", module.dequantize().detach()
            if module.bias is not None:
                yield f"{name}.bias", module.bias.detach()
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if tied and full == "lm_head.weight":
                continue
            yield full, (linear_weight(module) if pname == "weight" and is_linear_like(module) else p).detach()


def _count_tensors(model: nn.Module) -> int:
    return sum(1 for _ in model.named_parameters()) + sum(
        1 + (m.bias is not None) for m in model.modules() if isinstance(m, QuantLinear))


def _add_tokenizer(writer, tokenizer, source) -> None:
    """The tokenizer.* fields: copied from a GGUF file, else made from a transformers BPE tokenizer."""
    from gguf import GGUFValueType

    if source is not None:
        reader = read(source)
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = field.types[0]
            sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), vtype, sub)
        return
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise GGUFError("GGUF export needs a fast (tokenizer.json) tokenizer, or the GGUF file the model came from")
    import json

    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise GGUFError(f"GGUF export makes tokenizer fields from BPE tokenizers; this one is "
                        f"{spec.get('model', {}).get('type')!r} (pass the model's GGUF file as the tokenizer source)")
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        if i < len(tokens):
            tokens[i] = tok
    special = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    size = max(len(vocab), max(special, default=-1) + 1)
    tokens = (tokens + [None] * size)[:size]
    for i, content in special.items():
        tokens[i] = content
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    types = [3 if i in special else 1 for i in range(size)]  # 1 normal, 3 control (llama.cpp's token types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            add(value)
    writer.add_add_bos_token(False)
