"""Fuzzing lowbit's checkpoint readers: hypothesis draws a mutation of a good checkpoint (its manifest, a shard's
safetensors header, its length, a bitsandbytes quant_state or config) and the reader must either load it or raise
a documented error (CheckpointError), within 2 s. Shared by tests/test_fuzz_checkpoint.py (a few hundred cases)
and benchmarks/fuzz_checkpoint.py (10,000 and more)."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import torch
from hypothesis import strategies as st

import lowbit
from lowbit.interop.bitsandbytes import STATE_PREFIX, load_bnb_checkpoint, save_bnb_checkpoint

SECONDS = 2.0
DTYPES = ["F32", "F16", "BF16", "U8", "I8", "I32", "I64", "F64", "BOOL", "F8_E4M3", "U16", "X", "", "f32"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from(["../x.safetensors", "/etc/passwd", "a/b", "..", ".", "float64", "int4", "nf4", "Linear4bit"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32)
    return lowbit.quantize(LlamaForCausalLM(cfg).eval(), lowbit.NF4Config(), progress=False)


# One block linear layer per stored format: value mutations reach every layer type's codes and constants.
MIXED = {"self_attn.q_proj": "ternary", "self_attn.k_proj": "int8", "self_attn.v_proj": "gptq3-g32",
         "self_attn.o_proj": "spqr3", "mlp.gate_proj": "nf4", "mlp.up_proj": "fp4", "mlp.down_proj": "int8-weight"}


def mixed_model():
    """A small model holding one layer of each lowbit format (int8 embedding rows included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.plan import Plan

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32)
    plan = Plan(layers={f"model.layers.0.{k}": v for k, v in MIXED.items()}, embeddings="int8")
    calibration = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    return lowbit.quantize(LlamaForCausalLM(cfg).eval(), plan, calibration=calibration, progress=False)


def make_checkpoints(root: Path) -> tuple[Path, Path, Path]:
    """A lowbit checkpoint (two shards) and a bitsandbytes one of the same small NF4+DQ model, and a lowbit
    checkpoint of the mixed-format model."""
    model = tiny_model()
    ours = lowbit.save(model, root / "lowbit", max_shard_size=60_000)
    bnb = save_bnb_checkpoint(model, root / "bnb")
    mixed = lowbit.save(mixed_model(), root / "mixed")
    return ours, bnb, mixed


# --- mutations -------------------------------------------------------------------------------------------------------

def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def mutate_json(draw, doc):
    """Delete, replace or add one node anywhere in a JSON document."""
    paths = [p for p in _paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["delete", "replace", "replace", "add"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "replace":
        parent[path[-1]] = draw(JSON_VALUES)
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    else:
        parent.append(draw(JSON_VALUES))
    return doc


def read_header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_shard(draw, data: bytes) -> bytes:
    """A changed safetensors file: its header (dtype, shape, offsets, length prefix, junk) or its length."""
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "length", "junk-header", "truncate", "extend", "json"]))
    header, body = read_header(data)
    names = [k for k in header if k != "__metadata__"]
    name = draw(st.sampled_from(names))
    if kind == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(DTYPES))
    elif kind == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(-2, 2**40) | st.integers(0, 300), max_size=4))
    elif kind == "offsets":
        header[name]["data_offsets"] = draw(st.lists(st.integers(-1, 2**40) | st.integers(0, len(body) + 10),
                                                     min_size=0, max_size=3))
    elif kind == "length":
        raw = data[8:]
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, len(raw) + 10))) + raw
    elif kind == "junk-header":
        raw = draw(st.binary(max_size=64))
        return struct.pack("<Q", len(raw)) + raw + body
    elif kind == "truncate":
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=64))
    else:
        header = mutate_json(draw, header)
    return write_header(header, body)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mutated_lowbit(draw, good: Path, work: Path) -> Path:
    """A copy of the lowbit checkpoint with one mutation (checksums kept consistent with it most of the time, so
    that the reader gets past them to the parsing)."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(good, work)
    manifest = json.loads((work / "lowbit.json").read_text())
    if draw(st.booleans()):
        manifest = mutate_json(draw, manifest)
    else:
        i = draw(st.integers(0, len(manifest["shards"]) - 1))
        shard = manifest["shards"][i]
        data = mutate_shard(draw, (work / shard["file"]).read_bytes())
        (work / shard["file"]).write_bytes(data)
        if draw(st.integers(0, 4)):  # 4 in 5: the checksum matches the damaged file
            shard["sha256"], shard["bytes"] = _sha(data), len(data)
    (work / "lowbit.json").write_text(json.dumps(manifest))
    return work


# Values a hostile file may hold where a format expects its own: out-of-range codes, non-finite or negative
# constants, indices past the row; and ordinary values, which must still load and compute as the reference path does.
SPECIAL = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e30, -1e-30, 65504.0]
INTEGERS = [-2**31, -32768, -129, -128, -127, -1, 0, 1, 3, 7, 8, 15, 16, 63, 64, 65, 127, 255, 2**15 - 1, 2**31 - 1]


def mutated_values(draw, good: Path, work: Path) -> Path:
    """A copy of the checkpoint with one to three elements of its tensors changed (or a whole tensor filled) and every
    checksum recomputed, so that only the check of the values stands between the file and the kernels."""
    from safetensors.torch import load_file, save_file

    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(good, work)
    manifest = json.loads((work / "lowbit.json").read_text())
    shard = manifest["shards"][draw(st.integers(0, len(manifest["shards"]) - 1))]
    path = work / shard["file"]
    tensors = load_file(path)
    name = draw(st.sampled_from(sorted(tensors)))
    t = tensors[name].clone()
    flat = t.view(-1)
    if flat.numel():
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, flat.numel() - 1))
            if t.is_floating_point():
                v = draw(st.sampled_from(SPECIAL) | st.floats(-1e4, 1e4, width=32))
            else:
                info = torch.iinfo(t.dtype)
                v = draw(st.sampled_from([x for x in INTEGERS if info.min <= x <= info.max]) | st.integers(info.min, info.max))
            v = torch.tensor(v, dtype=torch.float64).to(t.dtype) if t.is_floating_point() else v  # fp16: 1e30 is inf
            if draw(st.integers(0, 9)) == 0:
                flat.fill_(v)
            else:
                flat[i] = v
    tensors[name] = t
    save_file(tensors, path, metadata={"format": "pt"})
    data = path.read_bytes()
    shard["sha256"], shard["bytes"] = _sha(data), len(data)
    (work / "lowbit.json").write_text(json.dumps(manifest))
    return work


def mutated_bnb(draw, good: Path, work: Path) -> Path:
    """A copy of the bitsandbytes checkpoint with its config, a quant_state's JSON or its safetensors file changed."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(good, work)
    kind = draw(st.sampled_from(["config", "quant_state", "shard"]))
    path = work / "model.safetensors"
    if kind == "config":
        config = json.loads((work / "config.json").read_text())
        (work / "config.json").write_text(json.dumps(mutate_json(draw, config)))
    elif kind == "quant_state":
        header, body = read_header(path.read_bytes())
        from safetensors.torch import load_file, save_file

        tensors = load_file(path)
        key = draw(st.sampled_from(sorted(k for k in tensors if STATE_PREFIX in k)))
        meta = json.loads(bytes(tensors[key].tolist()).decode())
        meta = mutate_json(draw, meta) if meta else meta
        tensors[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        save_file(tensors, path)
    else:
        path.write_bytes(mutate_shard(draw, path.read_bytes()))
    return work


# --- one case --------------------------------------------------------------------------------------------------------

IDS = torch.arange(24).remainder(64).reshape(2, 12)


def same_as_reference(model) -> bool:
    """Whether a loaded model's forward on the compiled kernels equals the plain-torch reference path's, float
    summation order aside: the two may differ by rounding of the largest values summed (a norm gain of 1e30 makes
    logits of 1e30 whose differences carry errors of 1e23), so the bound scales with the largest output; NaN and inf
    must stand in the same places."""
    from lowbit import kernels

    with torch.no_grad():
        fast = model(IDS).logits
        with kernels.reference_only():
            ref = model(IDS).logits
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(fast)) or not torch.equal(fast[~finite].nan_to_num(), ref[~finite].nan_to_num()):
        return False
    scale = float(ref[finite].abs().max()) if finite.any() else 0.0
    return bool(((fast - ref)[finite].abs() <= 1e-4 + 1e-3 * scale).all())


def check_case(read, outcomes: Counter, forward: bool = False) -> None:
    """Run ``read()``: a load or a CheckpointError within SECONDS of CPU time (wall time would count other
    processes on a shared machine); anything else fails the case. With ``forward``, a loaded model must also compute
    what the reference path computes."""
    t = time.process_time()
    try:
        model = read()
        outcomes["loaded"] += 1
    except lowbit.CheckpointError:
        outcomes["CheckpointError"] += 1
        model = None
    seconds = time.process_time() - t
    outcomes["slowest_ms"] = max(outcomes["slowest_ms"], round(seconds * 1000))
    assert seconds < SECONDS, f"took {seconds:.2f} s of CPU time"
    if forward and model is not None:
        assert same_as_reference(model), "loaded, but its forward differs from the reference path's"


def read_lowbit(path: Path):
    return lambda: lowbit.load(path)


def read_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(path)


def read_bnb(path: Path):
    return lambda: load_bnb_checkpoint(path)
