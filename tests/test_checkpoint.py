"""lowbit.save / lowbit.load: identical outputs after a round trip, atomic saves, clear errors on bad checkpoints."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.shards import ShardWriter
from transformers import AutoModelForCausalLM
from lowbit import checkpoint
from lowbit.nn import BitLinear, Int8Linear, Linear4bit

CONFIGS = {
    "int8": lowbit.Int8Config(),
    "int8-absmax": lowbit.Int8Config(activations="absmax"),
    "int8-weight": lowbit.Int8Config(weight_only=True),
    "nf4": lowbit.NF4Config(double_quant=False),
    "nf4-dq-bf16": lowbit.NF4Config(compute_dtype=torch.bfloat16),
    "fp4-dq": lowbit.NF4Config(quant_type="fp4"),
    "int4": lowbit.NF4Config(quant_type="int4", double_quant=False, blocksize=32),
    "ternary": lowbit.TernaryConfig(),
}


def tiny_llama(tied: bool = True, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_roundtrip_identical_outputs(tmp_path, name):
    model = lowbit.quantize(tiny_llama(), CONFIGS[name], progress=False)
    lowbit.save(model, tmp_path / "ck")
    loaded = lowbit.load(tmp_path / "ck")
    assert torch.equal(logits(model), logits(loaded))
    assert loaded.lowbit_config == CONFIGS[name]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert lowbit.memory_report(loaded) == lowbit.memory_report(model)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_checkpoint_older_than_zero_point_activations_loads_as_absmax(tmp_path):
    # Before zero-point activations existed (and then became the default), an int8 checkpoint recorded no
    # "activations": it was written by, and must still load as, absmax LLM.int8.
    model = lowbit.quantize(tiny_llama(), lowbit.Int8Config(activations="absmax"), progress=False)
    lowbit.save(model, tmp_path / "ck")
    path = tmp_path / "ck" / "lowbit.json"
    manifest = json.loads(path.read_text())
    del manifest["quantization"]["activations"]
    for spec in manifest["layers"].values():
        del spec["activations"]
    path.write_text(json.dumps(manifest))
    loaded = lowbit.load(tmp_path / "ck")
    assert loaded.lowbit_config == lowbit.Int8Config(activations="absmax")
    assert {m.activations for m in loaded.modules() if isinstance(m, Int8Linear)} == {"absmax"}
    assert torch.equal(logits(model), logits(loaded))


def test_real_model_sharded_roundtrip_with_tokenizer(tmp_path, smollm):
    model, tok = smollm
    q = lowbit.quantize(copy.deepcopy(model), lowbit.NF4Config(), progress=False)
    lowbit.save(q, tmp_path / "ck", tokenizer=tok, max_shard_size="32MB")
    manifest = json.loads((tmp_path / "ck" / "lowbit.json").read_text())
    assert len(manifest["shards"]) >= 3 and manifest["lowbit_version"] == lowbit.__version__
    assert manifest["quantization"]["method"] == "4bit" and manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert all(s["bytes"] <= 32e6 + 1e5 or len(s["tensors"]) == 1 for s in manifest["shards"])
    assert not list((tmp_path / "ck").glob("*.bin")) and not list((tmp_path / "ck").glob("*.pt"))  # no pickle
    loaded = lowbit.load(tmp_path / "ck")
    tok2 = lowbit.load_tokenizer(tmp_path / "ck")
    ids = tok2("def fibonacci(n):", return_tensors="pt").input_ids
    assert torch.equal(ids, tok("def fibonacci(n):", return_tensors="pt").input_ids)
    assert torch.equal(logits(q, ids), logits(loaded, ids))
    assert isinstance(loaded.model.layers[5].mlp.up_proj, Linear4bit)
    assert torch.equal(q.generate(ids, max_new_tokens=5, do_sample=False), loaded.generate(ids, max_new_tokens=5, do_sample=False))


def test_gpt2_conv1d_and_sequential_roundtrip(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=32)).eval()
    lowbit.quantize(gpt2, lowbit.Int8Config(), progress=False)
    lowbit.save(gpt2, tmp_path / "gpt2")
    assert torch.equal(logits(gpt2), logits(lowbit.load(tmp_path / "gpt2")))

    mlp = lowbit.quantize(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)), lowbit.TernaryConfig(), progress=False)
    lowbit.save(mlp, tmp_path / "mlp")
    with pytest.raises(lowbit.CheckpointError, match="pass the model"):
        lowbit.load(tmp_path / "mlp")
    skeleton = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    loaded = lowbit.load(tmp_path / "mlp", model=skeleton)
    assert isinstance(loaded[0], BitLinear)
    x = torch.randn(5, 32)
    assert torch.equal(mlp(x), loaded(x))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = lowbit.quantize(tiny_llama(), lowbit.NF4Config(), progress=False)
    second = lowbit.quantize(tiny_llama(hidden=64), lowbit.Int8Config(), progress=False)
    ck = tmp_path / "ck"
    lowbit.save(first, ck, max_shard_size=20_000)
    before = _files(ck)
    calls = []

    real_write = ShardWriter._write

    def failing_write(self, part, path):
        calls.append(path)
        if len(calls) == 2:  # half a shard on disk, then the process is interrupted
            Path(path).write_bytes(b"\0" * 100)
            raise KeyboardInterrupt
        return real_write(self, part, path)

    monkeypatch.setattr(ShardWriter, "_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        lowbit.save(second, ck, max_shard_size=20_000)
    assert _files(ck) == before
    assert torch.equal(logits(lowbit.load(ck)), logits(first))


HF_FILES = ("config.json", "model.safetensors.index.json", "generation_config.json")  # what transformers reads


def test_killed_save_leaves_previous_checkpoint_and_next_save_cleans_up(tmp_path):
    ck = tmp_path / "ck"
    lowbit.save(lowbit.quantize(tiny_llama(), lowbit.NF4Config(), progress=False), ck)
    expected = logits(lowbit.load(ck))
    # A process killed outright (no cleanup) in the middle of its second shard.
    script = f"""
import os, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import lowbit
from lowbit.shards import ShardWriter
from test_checkpoint import tiny_llama
n = []
real_write = ShardWriter._write
def dying_write(self, part, path):
    n.append(path)
    out = real_write(self, part, path)
    if len(n) == 2:
        with open(path, "r+b") as f:
            f.truncate(50)
        os._exit(9)
    return out
ShardWriter._write = dying_write
lowbit.save(lowbit.quantize(tiny_llama(), lowbit.TernaryConfig(), progress=False), {str(ck)!r}, max_shard_size=20_000)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert any(p.name.endswith(".tmp") for p in ck.iterdir())  # the dead save's debris
    assert torch.equal(logits(lowbit.load(ck)), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(ck)), expected)  # transformers' files are whole too
    first_files = {s["file"] for s in json.loads((ck / "lowbit.json").read_text())["shards"]}
    model = lowbit.quantize(tiny_llama(), lowbit.Int8Config(), progress=False)
    for _ in range(2):
        previous = {s["file"] for s in json.loads((ck / "lowbit.json").read_text())["shards"]}
        lowbit.save(model, ck)
        manifest = json.loads((ck / "lowbit.json").read_text())
        # The dead save's debris is gone; the previous checkpoint's shards stay one save longer (for loads that
        # read its manifest just before the commit), so the first save's are gone after the second.
        assert sorted(p.name for p in ck.iterdir()) == sorted({"lowbit.json", *HF_FILES, *previous,
                                                                *(s["file"] for s in manifest["shards"])})
    assert not first_files & {p.name for p in ck.iterdir()}


@pytest.fixture
def saved(tmp_path):
    model = lowbit.quantize(tiny_llama(), lowbit.NF4Config(), progress=False)
    lowbit.save(model, tmp_path / "ck")
    return tmp_path / "ck"


def _shard(ck: Path) -> Path:
    return next(ck.glob("*.safetensors"))


def test_truncated_shard(saved):
    shard = _shard(saved)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(lowbit.CheckpointError, match="truncated or modified"):
        lowbit.load(saved)
    with pytest.raises(lowbit.CheckpointError, match="cannot be read|damaged"):
        lowbit.load(saved, verify=False)


def test_tampered_shard(saved):
    shard = _shard(saved)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte inside a tensor: safetensors alone would not notice
    shard.write_bytes(bytes(data))
    with pytest.raises(lowbit.CheckpointError, match="checksum"):
        lowbit.load(saved)


def test_newer_format_version(saved):
    path = saved / "lowbit.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = checkpoint.FORMAT_VERSION + 1
    manifest["lowbit_version"] = "9.0.0"
    path.write_text(json.dumps(manifest))
    with pytest.raises(lowbit.CheckpointError, match="lowbit 9.0.0 in checkpoint format 2.*upgrade"):
        lowbit.load(saved)


def test_damaged_or_missing_manifest(saved, tmp_path):
    with pytest.raises(lowbit.CheckpointError, match="not a lowbit checkpoint"):
        lowbit.load(tmp_path / "nowhere")
    (saved / "lowbit.json").write_text('{"format": "lowbit", "format_')
    with pytest.raises(lowbit.CheckpointError, match="not valid JSON"):
        lowbit.load(saved)


def test_shape_and_dtype_mismatch(saved):
    with pytest.raises(lowbit.CheckpointError, match="shape mismatch at model.layers.0"):
        lowbit.load(saved, model=tiny_llama(hidden=128))
    # Float tensors outside lowbit layers come back in the dtype they were saved in, whatever the model held.
    loaded = lowbit.load(saved, model=tiny_llama().to(torch.bfloat16))
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    # A lowbit layer's own buffers must have the dtype its constructor gives them.
    from safetensors.torch import load_file, save_file

    shard = next(saved.glob("model-*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n, t in tensors.items() if "q_proj.weight_" in n and t.dtype == torch.float32)
    tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, shard)
    with pytest.raises(lowbit.CheckpointError, match=f"{name}: the checkpoint has torch.float16"):
        lowbit.load(saved, verify=False)
    mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(lowbit.CheckpointError, match="does not have"):
        lowbit.load(saved, model=mlp, verify=False)


def test_save_refuses_foreign_directory_and_meta_model(tmp_path):
    model = lowbit.quantize(tiny_llama(), lowbit.NF4Config(), progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(lowbit.CheckpointError, match="refusing"):
        lowbit.save(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(lowbit.CheckpointError, match="not a directory"):
        lowbit.save(model, tmp_path / "notes.txt")
    with torch.device("meta"):
        empty = nn.Linear(3, 3)
    with pytest.raises(lowbit.CheckpointError, match="meta device"):
        lowbit.save(empty, tmp_path / "new")
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def test_load_does_not_touch_the_directory(saved):
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in saved.iterdir()}
    with pytest.raises(lowbit.CheckpointError):
        lowbit.load(saved, model=tiny_llama(hidden=128))
    lowbit.load(saved)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in saved.iterdir()} == before
    assert os.listdir(saved) == list(before)
