"""GGUF files (llama.cpp's format) into lowbit models, keeping the quantized bits where a lowbit layer holds them exactly.

GGUF's Q4_0, Q4_1 and Q8_0 are blocks of 32 weights along the input dimension with an fp16 scale (and, for Q4_1,
an fp16 minimum): lowbit's IntLinear with groups of 32 holds the same codes (ggml's block layout:
github.com/ggml-org/ggml, docs/gguf.md and ggml-common.h). Q5_0, Q5_1, IQ4_NL, Q4_K and Q6_K weights load into
BlockLinear, which holds the file's bytes (and writes them back as they are). Other tensor types are dequantized
(with a warning naming them). Model structure, tensor names and the q/k row order of llama-family files come from transformers'
GGUF support, so every architecture transformers reads from GGUF loads here.

The file is untrusted input: it is read through a memory map, and any size it claims beyond the file is refused
before anything is allocated.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.checkpoint import assign, check_layers
from lowbit.manifest import CheckpointError
from lowbit.nn import BlockLinear, IntLinear
from lowbit.nn.base import is_linear_like, replace_module

NATIVE = ("Q4_0", "Q4_1", "Q8_0")  # GGUF tensor types loaded into IntLinear as they are
BLOCKS = ("Q5_0", "Q5_1", "IQ4_NL", "Q4_K", "Q6_K")  # ... and into BlockLinear, the file's bytes as they are
TERNARY = ("TQ1_0", "TQ2_0")  # loaded into BitLinear where the tensor is trits times one scale (BitNet b1.58's form)
_GROUP = 32
_KEEP_META = 16  # GGUF files whose config and tokenizer the cache keeps


class GGUFError(ValueError):
    """A GGUF file lowbit cannot read: the message says why."""


def read(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path``, or GGUFError for a file that is not a readable GGUF."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, EOFError, UnicodeDecodeError,
            AssertionError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {_first_line(e)})") from None
    for t in reader.tensors:  # the reader maps views lazily: check every claim against the file now
        if t.data_offset + t.n_bytes > size or t.n_bytes != t.data.nbytes:
            raise GGUFError(f"{path}: tensor {t.name} claims {t.n_bytes} bytes at offset {t.data_offset}, past the "
                            f"end of the {size}-byte file: truncated or damaged")
    return reader


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _field(reader, key: str):
    f = reader.fields.get(key)
    try:
        return None if f is None else f.contents()
    except UnicodeDecodeError:  # a damaged string field (found by test_damaged_gguf_is_one_error_type)
        raise GGUFError(f"GGUF field {key} is not valid UTF-8: the file is damaged") from None


def _codes_scale_zero(t) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, str]:
    """(codes [rows, cols] uint8, scale [rows, groups] fp16, zero [rows, groups], bits, zero dtype) of a Q4_0 /
    Q4_1 / Q8_0 tensor, such that w = (codes - zero) * scale."""
    kind = t.tensor_type.name
    rows = int(t.shape[1]) if len(t.shape) > 1 else 1
    cols = int(t.shape[0])
    b = np.asarray(t.data).reshape(rows, cols // _GROUP, -1)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        q = b[..., 2:34].copy().view(np.int8).astype(np.int16) + 128  # int8 codes as uint8 around a zero of 128
        return q.astype(np.uint8).reshape(rows, cols), d, np.full(d.shape, 128, np.uint8), 8, "uint8"
    qs = b[..., 4:20] if kind == "Q4_1" else b[..., 2:18]
    # ggml packs weight j of a block in the low nibble of byte j and weight j + 16 in its high nibble
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, cols)
    if kind == "Q4_0":  # w = (q - 8) * d
        return codes, d, np.full(d.shape, 8, np.uint8), 4, "uint8"
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    d32 = d.astype(np.float32)
    # w = q * d + m = (q - (-m / d)) * d. A block with d = 0 is the constant m: codes 0, scale 1, zero -m.
    flat = d32 == 0
    zero = np.where(flat, -m, -m / np.where(flat, 1, d32))
    if flat.any():
        codes = codes.reshape(rows, -1, _GROUP)
        codes[flat] = 0
        codes = codes.reshape(rows, cols)
        d = np.where(flat, np.float16(1), d)
    return codes, d, zero.astype(np.float32), 4, "float32"


def _row_order(processor, name: str, rows: int, cols: int, conv1d: bool) -> np.ndarray | None:
    """Which GGUF row each row of the [out, in] weight is (transformers' processors undo llama.cpp's q/k
    permutation and GPT-2's transpose); None where the processor does more than reorder whole rows."""
    index = np.arange(rows * cols, dtype=np.int32 if rows * cols < 2**31 else np.int64).reshape(rows, cols)
    out = np.asarray(processor.process(index, name).weights)
    out = out.T if conv1d else out
    if out.shape != (rows, cols):
        return None
    order = out[:, 0] // cols
    return order if np.array_equal(out, index[order]) else None


def load_gguf(path: str | Path, native: bool = True, dtype: torch.dtype = torch.float32, progress: bool = True):
    """(model, tokenizer) from a GGUF file: Q4_0 / Q4_1 / Q8_0 linear weights as IntLinear layers holding the file's
    own codes (``native``), everything else dequantized to ``dtype``."""
    from accelerate import init_empty_weights
    from gguf import GGMLQuantizationType, dequantize
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from lowbit.manifest import CONFIG_ERRORS, CheckpointError, check_config_scale

    path = Path(path)
    reader = read(path)
    arch = _field(reader, "general.architecture")
    meta = _config_and_tokenizer(path, arch)
    try:
        config = AutoConfig.from_pretrained(meta)
        # sizes the file cannot back (a damaged header) would build huge buffers or take minutes
        check_config_scale(config.to_dict(), len(reader.tensors), path.stat().st_size, where=path.name)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except CheckpointError as e:
        raise GGUFError(str(e).replace("the checkpoint", "the file")) from None
    except CONFIG_ERRORS as e:
        raise GGUFError(f"{path}: its header describes no model transformers can build ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = _tensor_names(model, arch, processor, {t.name for t in reader.tensors})
    state = model.state_dict(keep_vars=True)
    owners = {name: name.rpartition(".")[0] for name in state}
    quantized, dequantized = [], {}
    for t in tqdm(reader.tensors, desc="reading GGUF", disable=None if progress else True, leave=False):
        hf = names.get(t.name)
        if hf is None or hf not in state:
            raise GGUFError(f"{path}: tensor {t.name} has no place in {type(model).__name__}")
        module = model.get_submodule(owners[hf])
        kind = t.tensor_type.name
        if int(t.n_elements) != state[hf].numel():
            raise GGUFError(f"{path}: tensor {t.name} holds {int(t.n_elements)} values, {hf} needs "
                            f"{tuple(state[hf].shape)}: the file does not match its own header")
        if (native and kind in NATIVE + BLOCKS and hf.endswith(".weight") and is_linear_like(module)
                and int(t.shape[0]) % _GROUP == 0):
            quantized.append((t, hf))
            continue
        ternary = native and kind in TERNARY and hf.endswith(".weight") and is_linear_like(module)
        if kind not in ("F32", "F16", "BF16") and not ternary:
            dequantized[t.name] = kind
        try:
            w = dequantize(t.data, GGMLQuantizationType(t.tensor_type)) if kind != "F32" else np.asarray(t.data)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise GGUFError(f"{path}: tensor {t.name} is of type {kind}, which the gguf package cannot read "
                            f"({_first_line(e)})") from None
        w = np.asarray(processor.process(np.asarray(w, dtype=np.float32), t.name).weights)
        w = torch.from_numpy(np.array(w)).reshape(state[hf].shape)
        if ternary:
            layer = _bitlinear(module, w, dtype)
            if layer is not None:
                replace_module(model, owners[hf], layer)
                continue
            dequantized[t.name] = f"{kind}, more than one scale per tensor"
        assign(model, hf, w.to(dtype))
    if dequantized and native:
        listed = ", ".join(f"{n} ({k})" for n, k in list(dequantized.items())[:4])
        more = f" and {len(dequantized) - 4} more" if len(dequantized) > 4 else ""
        warnings.warn(f"{path.name}: dequantized to {str(dtype).removeprefix('torch.')}: {listed}{more} (lowbit keeps "
                      f"{', '.join(NATIVE + BLOCKS)} weights of linear layers as they are)", stacklevel=2)
    for t, hf in quantized:  # after the biases, which the new layers take over
        name = owners[hf]
        module = model.get_submodule(name)
        out_f, in_f = (int(t.shape[1]), int(t.shape[0]))
        order = _row_order(processor, t.name, out_f, in_f, conv1d=not isinstance(module, nn.Linear))
        if order is None:
            raise GGUFError(f"{path}: the rows of {t.name} do not map one to one onto {hf}")
        bias = getattr(module, "bias", None)
        if bias is not None and bias.is_meta:  # every bias was read above: the file lacks this one
            raise GGUFError(f"{path}: the file lacks {name}.bias, which {hf} needs")
        if t.tensor_type.name in BLOCKS:  # whole rows of blocks: the row order applies to the bytes
            layer = BlockLinear(in_f, out_f, bias is not None, t.tensor_type.name.lower(), dtype)
            layer.weight_blocks = torch.from_numpy(np.ascontiguousarray(np.asarray(t.data).reshape(out_f, -1)[order]))
            layer.copy_bias(bias)
            replace_module(model, name, layer)
            continue
        codes, scale, zero, bits, zero_dtype = _codes_scale_zero(t)
        layer = IntLinear.from_codes(torch.from_numpy(codes[order]), torch.from_numpy(scale[order].astype(np.float32)),
                                     torch.from_numpy(np.ascontiguousarray(zero[order])), bias, bits, _GROUP,
                                     dtype, zero_dtype)
        replace_module(model, name, layer)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if missing:
        raise GGUFError(f"{path}: the file lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    try:
        check_layers(model, {})  # the file's scales: finite, as every loader checks
    except CheckpointError as e:
        raise GGUFError(f"{path}: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(meta)
    model.gguf_source = {"path": str(path), "types": sorted({t.tensor_type.name for t in reader.tensors})}
    return model.eval(), tokenizer


def _config_and_tokenizer(path: Path, arch) -> Path:
    """A folder with the model's config.json and tokenizer, made from the GGUF's metadata by transformers once per
    file (each of its readings parses the whole vocabulary, ~8 s for SmolLM2) and kept in lowbit's cache."""
    import hashlib
    import os
    import shutil
    import tempfile

    from transformers import AutoConfig, AutoTokenizer

    from lowbit.cache import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf-meta" / key
    if (target / "config.json").is_file():
        return target
    from lowbit.manifest import CONFIG_ERRORS

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (*CONFIG_ERRORS, NotImplementedError) as e:
        raise GGUFError(f"{path}: transformers cannot build a model from this GGUF (architecture {arch!r}): "
                        f"{_first_line(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exception on a damaged vocabulary
        raise GGUFError(f"{path}: no usable tokenizer in this GGUF ({type(e).__name__}: {_first_line(e)})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    kept = sorted((p for p in target.parent.iterdir() if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    for old in kept[:-_KEEP_META]:  # the cache holds the most recent files' metadata only
        shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _tensor_names(model: nn.Module, arch: str, processor, wanted: set[str]) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, by gguf's table of names for ``arch``."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    names = {}
    if arch_id is not None:
        table = get_tensor_name_map(arch_id, model.config.num_hidden_layers)
        for hf in model.state_dict():
            suffix = hf.rpartition(".")[2]
            gguf_name = table.get_name(processor.preprocess_name(hf).rpartition(".")[0])
            if gguf_name is not None and suffix in ("weight", "bias"):
                names[f"{gguf_name}.{suffix}"] = hf
    if not wanted <= set(names):  # models named from a submodule (Bloom): transformers' slower search
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        names = get_gguf_hf_weights_map(model, processor)
    return names


def _bitlinear(module: nn.Module, w: torch.Tensor, dtype: torch.dtype):
    """A BitLinear holding ``w`` [out, in] (a Conv1D's [in, out] turned) exactly, if it is trits times one scale;
    else None. TQ1_0 / TQ2_0 keep a scale per 256 weights: b1.58 models have one per tensor."""
    from lowbit.formats import pack_ternary_2bit
    from lowbit.nn import BitLinear

    w = w if isinstance(module, nn.Linear) else w.t()
    scales = w.abs()[w != 0].unique()
    if scales.numel() > 1:
        return None
    gamma = scales[0] if scales.numel() else torch.tensor(1.0)
    layer = BitLinear(w.shape[1], w.shape[0], getattr(module, "bias", None) is not None, dtype)
    layer.weight_packed = pack_ternary_2bit(torch.sign(w).to(torch.int8).reshape(-1))
    layer.weight_gamma = gamma.float().reshape(())
    bias = getattr(module, "bias", None)
    if bias is not None and not bias.is_meta:
        layer.copy_bias(bias)
    elif bias is not None:
        layer.bias = torch.empty(bias.shape, device="meta")  # read later from the file
    return layer
