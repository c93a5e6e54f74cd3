"""A checkpoint's *values* as untrusted input, through both loaders (lowbit.load and transformers' from_pretrained).

Each tampered case rewrites one tensor of a saved checkpoint and recomputes the shard's checksum, as an attacker
would: the checksum passes, so only the check of the values can refuse it. Before that check these loaded: a
ternary code 3 that the compiled kernel reads as +2, NaN constants that attention turns into finite wrong logits,
SpQR outlier indices past the row, a 3-bit zero of 255."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.nn import BitLinear, Int8Linear, IntLinear, Linear4bit, SpQRLinear
from lowbit.plan import Plan
from test_checkpoint import IDS, logits, tiny_llama

CALIB = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
# One layer of each stored format, so every layer's check_values runs on a real layer of the model.
FORMATS = {"self_attn.q_proj": "ternary", "self_attn.k_proj": "int8", "self_attn.v_proj": "gptq3-g32",
           "self_attn.o_proj": "spqr3", "mlp.gate_proj": "nf4", "mlp.up_proj": "fp4", "mlp.down_proj": "int8-weight"}
L0 = "model.layers.0."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tiny_llama()
    plan = Plan(layers={f"model.layers.{i}.{k}": v for i in range(2) for k, v in FORMATS.items()})
    model = lowbit.quantize(base, plan, calibration=CALIB, progress=False)
    o = model.model.layers[0].self_attn.o_proj
    assert isinstance(o, SpQRLinear) and o.num_outliers() > 0  # the outlier cases below have indices to break
    folder = lowbit.save(model, tmp_path_factory.mktemp("values") / "good")
    return folder, logits(model)


def tamper(good: Path, work: Path, name: str, change) -> Path:
    """A copy of ``good`` with tensor ``name`` replaced by ``change(tensor)``, its shard's checksum recomputed."""
    shutil.copytree(good, work)
    manifest = json.loads((work / "lowbit.json").read_text())
    shard = next(s for s in manifest["shards"] if name in s["tensors"])
    path = work / shard["file"]
    tensors = load_file(path)
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, path, metadata={"format": "pt"})
    data = path.read_bytes()
    shard["sha256"], shard["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (work / "lowbit.json").write_text(json.dumps(manifest))
    return work


def from_pretrained(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


LOADERS = {"lowbit.load": lowbit.load, "from_pretrained": from_pretrained}


def _set(index, value):
    def change(t):
        t.view(-1)[index] = value
        return t
    return change


CASES = {
    # item 1: the compiled kernel read code 3 as the weight +2; dequantize() and the reference path refused it
    "ternary code 3": (L0 + "self_attn.q_proj.weight_packed", _set(0, 0xFF), "not a trit"),
    "ternary gamma NaN": (L0 + "self_attn.q_proj.weight_gamma", _set(0, float("nan")), "NaN or inf"),
    # item 2: NaN / inf constants
    "NF4 codebook entry NaN": (L0 + "mlp.gate_proj.weight_code", _set(3, float("nan")), "NaN or inf"),
    "double-quant absmax inf": (L0 + "mlp.gate_proj.weight_nested_absmax", _set(0, float("inf")), "NaN or inf"),
    "double-quant offset NaN": (L0 + "mlp.gate_proj.weight_nested_offset", _set(0, float("nan")), "NaN or inf"),
    "FP4 codebook entry -inf": (L0 + "mlp.up_proj.weight_code", _set(5, float("-inf")), "NaN or inf"),
    "SpQR statistic scale inf": (L0 + "self_attn.o_proj.stat_scale", _set(0, float("inf")), "NaN or inf"),
    "SpQR outlier value NaN": (L0 + "self_attn.o_proj.outlier_values", _set(0, float("nan")), "NaN or inf"),
    "int8 row scale NaN": (L0 + "self_attn.k_proj.weight_absmax", _set(0, float("nan")), "NaN or inf"),
    "int8 row scale negative": (L0 + "self_attn.k_proj.weight_absmax", _set(0, -1.0), "below"),
    "int8 code -128": (L0 + "self_attn.k_proj.weight_codes", _set(0, -128), "below"),
    "int8 weight-only scale inf": (L0 + "mlp.down_proj.weight_absmax", _set(1, float("inf")), "NaN or inf"),
    "GPTQ scale NaN": (L0 + "self_attn.v_proj.weight_scale", _set(0, float("nan")), "NaN or inf"),
    # item 7: SpQR indices and a GPTQ zero out of range
    "SpQR outlier column past the row": (L0 + "self_attn.o_proj.outlier_cols", _set(0, 64), "above"),
    "SpQR outlier column negative": (L0 + "self_attn.o_proj.outlier_cols", _set(0, -1), "below"),
    "SpQR row pointer falls": (L0 + "self_attn.o_proj.outlier_rowptr", lambda t: t.flip(0), "outlier_rowptr"),
    "SpQR row pointer past the outliers": (L0 + "self_attn.o_proj.outlier_rowptr", _set(-1, 10**6), "outlier_rowptr"),
    "GPTQ 3-bit zero 255": (L0 + "self_attn.v_proj.weight_zero", _set(0, 255), "above"),
    "bias NaN": (None, None, "NaN or inf"),  # filled below: a layer with a bias
    # item 6: a tensor of the wrong dtype failed only at forward, deep in a kernel
    "packed codes as int8": (L0 + "mlp.gate_proj.weight_packed", lambda t: t.to(torch.int8), "expects torch.uint8"),
    "row scales as float16": (L0 + "self_attn.k_proj.weight_absmax", lambda t: t.half(), "expects torch.float32"),
}
del CASES["bias NaN"]  # the tiny Llama has no biases; bias finiteness is checked by the base class (test below)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", CASES)
def test_tampered_values_are_refused_by_both_loaders(saved, tmp_path, loader, case):
    name, change, message = CASES[case]
    work = tamper(saved[0], tmp_path / "ck", name, change)
    with pytest.raises(lowbit.CheckpointError, match=message) as e:
        LOADERS[loader](work)
    assert name.rpartition(".")[0].removesuffix(".rows") in str(e.value) or name in str(e.value)  # names the layer


@pytest.mark.parametrize("loader", LOADERS)
def test_intact_checkpoint_loads_through_both_to_the_same_logits(saved, loader):
    assert torch.equal(logits(LOADERS[loader](saved[0])), saved[1])


def test_check_values_accepts_every_freshly_quantized_layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    layers = [Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, weight_only=True), BitLinear.from_linear(lin),
              Linear4bit.from_linear(lin, "nf4", 64, True), Linear4bit.from_linear(lin, "fp4"),
              IntLinear.from_linear(lin, bits=3, group_size=16), IntLinear.from_linear(lin, bits=2, group_size=32)]
    for layer in layers:
        layer.check_values()
        layer.bias[0] = float("nan")
        with pytest.raises(ValueError, match="bias holds NaN"):
            layer.check_values()


def test_ternary_code_3_never_reaches_the_kernel_through_a_load(saved, tmp_path):
    """The value the compiled kernel read as +2 (item 1): the refusal is the loader's, before any forward."""
    from lowbit.formats import ternary_2bit_valid

    packed = torch.tensor([0b10_01_00_10, 0b11_00_00_00], dtype=torch.uint8)
    assert not ternary_2bit_valid(packed) and ternary_2bit_valid(packed[:1])
    every = torch.arange(256, dtype=torch.uint8)
    fields = torch.stack([(every >> s) & 3 for s in (0, 2, 4, 6)])
    assert torch.equal(torch.tensor([ternary_2bit_valid(b[None]) for b in every]), (fields != 3).all(0))


@pytest.mark.parametrize("loader", LOADERS)
def test_shard_linked_out_of_the_folder_is_refused(saved, tmp_path, loader):
    """Item 6: from_pretrained followed a shard symlinked into another folder."""
    work = shutil.copytree(saved[0], tmp_path / "ck")
    shard = sorted(work.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(lowbit.CheckpointError, match="outside the checkpoint folder"):
        LOADERS[loader](work)


@pytest.mark.parametrize("loader", LOADERS)
def test_shard_that_fails_its_checksum_is_refused(saved, tmp_path, loader):
    """Item 6: from_pretrained ignored the sha256 that lowbit.load checks."""
    work = shutil.copytree(saved[0], tmp_path / "ck")
    manifest = json.loads((work / "lowbit.json").read_text())
    name = L0 + "mlp.gate_proj.weight_packed"
    shard = next(s for s in manifest["shards"] if name in s["tensors"])
    tensors = load_file(work / shard["file"])
    tensors[name] = tensors[name] ^ 1  # valid codes, other weights: only the checksum can tell
    save_file(tensors, work / shard["file"], metadata={"format": "pt"})
    with pytest.raises(lowbit.CheckpointError, match="checksum"):
        LOADERS[loader](work)


def test_config_json_layers_must_match_the_manifest(saved, tmp_path):
    """from_pretrained builds the layers config.json describes; lowbit.load those of lowbit.json: they must agree."""
    work = shutil.copytree(saved[0], tmp_path / "ck")
    config = json.loads((work / "config.json").read_text())
    config["quantization_config"]["layers"][L0 + "mlp.gate_proj"]["blocksize"] = 32
    (work / "config.json").write_text(json.dumps(config))
    with pytest.raises(lowbit.CheckpointError, match="other layers than lowbit.json"):
        from_pretrained(work)


def test_cli_eval_of_a_nan_checkpoint_is_one_line_and_exit_2(smollm, tmp_path):
    """Item 2: `lowbit eval` printed `perplexity nan` and exited 0."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = lowbit.quantize(LlamaForCausalLM(cfg).eval(), lowbit.NF4Config(), progress=False)
    good = lowbit.save(model, tmp_path / "good", tokenizer=tok)
    work = tamper(good, tmp_path / "ck", L0 + "mlp.gate_proj.weight_nested_absmax", _set(0, float("nan")))
    r = subprocess.run([sys.executable, "-m", "lowbit", "eval", str(work), "--tokens", "64", "--threads", "1"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert "NaN or inf" in r.stderr and "Traceback" not in r.stderr


def _drop(name):
    def change(tensors):
        del tensors[name]
        return tensors
    return change


def _add(name, value):
    def change(tensors):
        tensors[name] = value
        return tensors
    return change


def tamper_shard(good: Path, work: Path, name: str, change) -> Path:
    """A copy of ``good`` whose shard holding ``name`` is rewritten by ``change(tensors)``, checksums recomputed and
    the manifest's list of tensors left as it was."""
    shutil.copytree(good, work)
    manifest = json.loads((work / "lowbit.json").read_text())
    shard = next(s for s in manifest["shards"] if name in s["tensors"])
    path = work / shard["file"]
    save_file(change(load_file(path)), path, metadata={"format": "pt"})
    data = path.read_bytes()
    shard["sha256"], shard["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (work / "lowbit.json").write_text(json.dumps(manifest))
    return work


NORM = L0 + "input_layernorm.weight"
SHARD_CASES = {  # found by the rerun of the probes: from_pretrained filled a missing tensor with fresh memory
    "missing quantized tensor": (L0 + "self_attn.k_proj.weight_absmax", _drop(L0 + "self_attn.k_proj.weight_absmax"),
                                 "lacks|other tensors"),
    "missing norm": (NORM, _drop(NORM), "lacks|other tensors"),
    "extra tensor": (NORM, _add("model.extra.weight", torch.zeros(3)), "does not have|other tensors"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", SHARD_CASES)
def test_missing_or_extra_tensors_are_refused_by_both_loaders(saved, tmp_path, loader, case):
    name, change, message = SHARD_CASES[case]
    with pytest.raises(lowbit.CheckpointError, match=message):
        LOADERS[loader](tamper_shard(saved[0], tmp_path / "ck", name, change))


FLOAT_CASES = {  # a float tensor outside the lowbit layers: lowbit.load took any float dtype, transformers' any shape
    "norm of another shape": (lambda t: t[:32].clone(), "expects"),
    "norm in float64": (lambda t: t.double(), "expects|mixes"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", FLOAT_CASES)
def test_float_tensors_of_the_wrong_shape_or_dtype_are_refused(saved, tmp_path, loader, case):
    change, message = FLOAT_CASES[case]
    work = tamper(saved[0], tmp_path / "ck", NORM, change)
    if loader == "from_pretrained" and case == "norm in float64":
        # transformers casts a float tensor to the model's dtype as it reads it: the model computes as it should
        assert torch.equal(logits(from_pretrained(work)), logits(lowbit.load(saved[0])))
        return
    with pytest.raises(lowbit.CheckpointError, match=message):
        LOADERS[loader](work)


def test_lowbit_load_refuses_one_norm_in_bfloat16_among_float32(saved, tmp_path):
    work = tamper(saved[0], tmp_path / "ck", NORM, lambda t: t.bfloat16())
    with pytest.raises(lowbit.CheckpointError, match="mixes float dtypes"):
        lowbit.load(work)


def test_cli_on_a_config_json_transformers_cannot_build_is_one_line(tmp_path):
    """A field of the wrong type in config.json gave a 75-line StrictDataclassFieldValidationError traceback."""
    import subprocess
    import sys

    folder = tmp_path / "src"
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = "abc"
    (folder / "config.json").write_text(json.dumps(config))
    for args in (["quantize", str(folder), "--method", "nf4", "--out", str(tmp_path / "q")],
                 ["quantize", str(folder), "--method", "nf4", "--in-memory", "--out", str(tmp_path / "q")]):
        r = subprocess.run([sys.executable, "-m", "lowbit", *args, "--threads", "1"], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
