"""Checkpoints as untrusted input (issue 14): every saved dtype loads back, a malformed or hostile manifest gives
CheckpointError naming its field, and loads racing a save in another process see one whole checkpoint."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lowbit
from test_checkpoint import IDS, logits, tiny_llama

CONFIGS = {
    "int8": lambda: lowbit.Int8Config(),
    "int8-weight-bf16": lambda: lowbit.Int8Config(weight_only=True, compute_dtype=torch.bfloat16),
    "nf4-dq": lambda: lowbit.NF4Config(),
    "fp4-fp16": lambda: lowbit.NF4Config(quant_type="fp4", compute_dtype=torch.float16),
    "int4": lambda: lowbit.NF4Config(quant_type="int4"),
    "int3": lambda: lowbit.IntConfig(bits=3, group_size=32),
    "ternary": lambda: lowbit.TernaryConfig(),
    "none": lambda: None,
}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_dtype_save_accepts_load_restores(tmp_path, config, dtype, tied):
    model = tiny_llama(tied=tied).to(dtype)
    if CONFIGS[config]() is not None:
        lowbit.quantize(model, CONFIGS[config](), progress=False)
    lowbit.save(model, tmp_path / "ck")
    loaded = lowbit.load(tmp_path / "ck")
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for name, t in saved_state.items():
        assert loaded_state[name].dtype == t.dtype and torch.equal(loaded_state[name], t), name
    assert torch.equal(logits(loaded), logits(model))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_compute_dtypes_a_checkpoint_cannot_name_are_refused_up_front():
    with pytest.raises(ValueError, match="compute_dtype must be"):
        lowbit.NF4Config(compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="compute_dtype must be"):
        lowbit.nn.Linear4bit(64, 64, compute_dtype=torch.float64)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    ck = tmp_path_factory.mktemp("good") / "ck"
    lowbit.save(lowbit.quantize(tiny_llama(), lowbit.NF4Config(), progress=False), ck)
    return ck


def _copy(good: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(good, dst)
    manifest = json.loads((dst / "lowbit.json").read_text())
    edit(manifest)
    (dst / "lowbit.json").write_text(json.dumps(manifest))
    return dst


def _first_layer(m: dict) -> dict:
    return next(iter(m["layers"].values()))


MALFORMED = {
    "traversal": (lambda m: m["shards"][0].update(file="../elsewhere/x.safetensors"), r"shards\[0\]\.file"),
    "absolute path": (lambda m: m["shards"][0].update(file="/etc/passwd"), r"shards\[0\]\.file"),
    "tokenizer traversal": (lambda m: m.update(tokenizer=".."), "tokenizer"),
    "missing in_features": (lambda m: _first_layer(m).pop("in_features"), "in_features is missing"),
    "in_features a string": (lambda m: _first_layer(m).update(in_features="64"), "in_features must be an integer"),
    "negative blocksize": (lambda m: _first_layer(m).update(blocksize=-64), "blocksize"),
    "unknown layer field": (lambda m: _first_layer(m).update(evil=1), "unknown field"),
    "unknown layer type": (lambda m: _first_layer(m).update(type="os.system"), r"\.type"),
    "missing model_type": (lambda m: m["model_config"].pop("model_type"), "model_config.model_type is missing"),
    "missing sha256": (lambda m: m["shards"][0].pop("sha256"), r"shards\[0\]\.sha256 is missing"),
    "bad sha256": (lambda m: m["shards"][0].update(sha256="abc"), r"shards\[0\]\.sha256"),
    "shard a string": (lambda m: m.update(shards=["model.safetensors"]), r"shards\[0\] must be an object"),
    "shards missing": (lambda m: m.pop("shards"), "shards is missing"),
    "tied a list": (lambda m: m.update(tied=["x"]), "tied must be an object"),
    "tied to a number": (lambda m: m.update(tied={"lm_head.weight": 3}), r"tied\['lm_head.weight'\]"),
    "unknown dtype": (lambda m: _first_layer(m).update(compute_dtype="float128"), "compute_dtype"),
    "layers a list": (lambda m: m.update(layers=[]), "layers must be an object"),
    "bad quantization": (lambda m: m.update(quantization={"method": "4bit", "blocksize": 0}), "quantization"),
    "tensors not a list": (lambda m: m["shards"][0].update(tensors="x"), r"shards\[0\]\.tensors"),
    "tensor list changed": (lambda m: m["shards"][0]["tensors"].pop(), "other tensors than lowbit.json lists"),
    "model_type unknown": (lambda m: m["model_config"].update(model_type="no-such-arch"), "model_config"),
    "negative vocabulary": (lambda m: m["model_config"].update(vocab_size=-5), "model_config"),  # found by fuzzing
    # Sizes the meta-device build still pays for: minutes of module building, a rotary buffer of 2 GB.
    "20,000 layers": (lambda m: m["model_config"].update(num_hidden_layers=20_000), "num_hidden_layers = 20000 layers"),
    "huge head_dim": (lambda m: m["model_config"].update(head_dim=10**9), "head_dim = 1000000000 is larger than"),
    "manifest a list": (lambda m: (m.clear(), m.update(format="lowbit", format_version=1, layers=5)), "layers"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_manifest_field_is_named(tmp_path, good, case):
    edit, field = MALFORMED[case]
    ck = _copy(good, tmp_path / "ck", edit)
    with pytest.raises(lowbit.CheckpointError, match=field):
        lowbit.load(ck)


def test_symlinked_shard_pointing_outside_is_refused(tmp_path, good):
    import shutil

    ck = _copy(good, tmp_path / "ck", lambda m: None)
    manifest = json.loads((ck / "lowbit.json").read_text())
    outside = tmp_path / "outside.safetensors"
    shutil.move(ck / manifest["shards"][0]["file"], outside)
    os.symlink(outside, ck / manifest["shards"][0]["file"])
    with pytest.raises(lowbit.CheckpointError, match="points outside the checkpoint folder"):
        lowbit.load(ck)


def test_cli_reports_a_malformed_manifest_in_one_line(tmp_path, good):
    ck = _copy(good, tmp_path / "ck", lambda m: _first_layer(m).pop("in_features"))
    proc = subprocess.run([sys.executable, "-m", "lowbit", "eval", str(ck), "--tokens", "16"], capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stderr
    assert "in_features is missing" in proc.stderr and "Traceback" not in proc.stderr


_RACE = """
import sys, time, torch
sys.path.insert(0, {tests!r})
import lowbit
from test_checkpoint import tiny_llama
models = [lowbit.quantize(tiny_llama(), c, progress=False) for c in (lowbit.NF4Config(), lowbit.Int8Config())]
deadline = time.time() + {seconds}
i = 0
while time.time() < deadline:
    lowbit.save(models[i % 2], {ck!r}, max_shard_size=30_000)  # several shards: a wider window for the race
    i += 1
print(i)
"""


def race(ck: Path, seconds: float) -> dict:
    """Load ``ck`` again and again while another process saves two different models into it in turn for
    ``seconds``: counts of saves, loads, loads equal to each model, and loads that failed (with the first error)."""
    configs = (lowbit.NF4Config(), lowbit.Int8Config())
    expected = [logits(lowbit.quantize(tiny_llama(), c, progress=False)) for c in configs]
    lowbit.save(lowbit.quantize(tiny_llama(), configs[0], progress=False), ck)
    saver = subprocess.Popen([sys.executable, "-c", _RACE.format(tests=str(Path(__file__).parent), ck=str(ck),
                                                                 seconds=seconds)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counts = {"loads": 0, "first": 0, "second": 0, "failed": 0, "error": None}
    t0 = time.time()
    try:
        while saver.poll() is None and time.time() - t0 < seconds + 60:
            counts["loads"] += 1
            try:
                out = logits(lowbit.load(ck))
            except Exception as e:  # counted, and the first one kept for the report
                counts["failed"] += 1
                counts["error"] = counts["error"] or f"{type(e).__name__}: {e}"
                continue
            match = [torch.equal(out, e) for e in expected]
            counts["first" if match[0] else "second" if match[1] else "failed"] += 1
    finally:
        saver.kill()
        stdout, stderr = saver.communicate()
    counts["saves"] = int(stdout.strip() or 0) if saver.returncode in (0, -9) else f"saver failed: {stderr[-300:]}"
    return counts


def test_loads_racing_a_save_in_another_process_see_one_whole_checkpoint(tmp_path):
    counts = race(tmp_path / "ck", seconds=12)
    assert counts["failed"] == 0, counts
    assert isinstance(counts["saves"], int) and counts["saves"] >= 10 and counts["loads"] >= 10, counts
    assert counts["first"] and counts["second"], counts  # both checkpoints were seen, each whole
