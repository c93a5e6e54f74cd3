"""Streamed quantization (lowbit.quantize_checkpoint): the same checkpoint, byte for byte, as quantizing the loaded
model; clear errors on damaged sources; nothing written when it fails."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit import CheckpointError
from lowbit.config import config_from_name
from lowbit.calibrate import calibration_batches
from lowbit.shards import SafetensorsFolder, map_tensors
from lowbit.stream import quantize_checkpoint


def _random_folder(path: Path, arch: str = "llama", tie: bool = False, dtype=torch.bfloat16, shard: str = "60KB"):
    """A transformers folder of a random-weight model, saved in ``dtype`` and sharded."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    else:
        config = transformers.LlamaConfig(**common)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def _in_memory(src: Path, dst: Path, config, calibration=None, tokenizer=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    lowbit.quantize(model, config, progress=False, calibration=calibration)
    lowbit.save(model, dst, tokenizer=tokenizer)


def _same_checkpoint(a: Path, b: Path) -> None:
    """Equal manifests (but for the save's own file names), equal shard bytes, equal transformers files."""
    ma, mb = (json.loads((d / "lowbit.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        for s in m["shards"]:
            s.pop("file")
    assert ma == mb
    for name in ("config.json", "generation_config.json"):
        if (a / name).exists() or (b / name).exists():
            assert (a / name).read_text() == (b / name).read_text(), name
    for sa, sb in zip(sorted(a.glob("model-*.safetensors")), sorted(b.glob("model-*.safetensors"))):
        assert sa.read_bytes() == sb.read_bytes()


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("method", ["nf4", "int8", "int4", "int8-weight"])
def test_streamed_equals_in_memory_on_random_models(tmp_path, arch, tie, method):
    from lowbit.app.methods import method_config

    src = _random_folder(tmp_path / "src", arch, tie)
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded source, with an index
    config = method_config(method)
    _in_memory(src, tmp_path / "mem", config)
    stats = quantize_checkpoint(src, tmp_path / "stream", config, progress=False)
    _same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    assert stats["layers"] == 14 and stats["peak_rss_bytes"] > 0
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "stream")(x).logits, lowbit.load(tmp_path / "mem")(x).logits)


@pytest.mark.parametrize("method", ["gptq", "spqr"])
def test_streamed_calibration_equals_in_memory(tmp_path, method):
    from lowbit.app.methods import method_config

    src = _random_folder(tmp_path / "src", "llama", tie=True)
    config = method_config(method, bits=3 if method == "spqr" else 4)
    calibration = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    _in_memory(src, tmp_path / "mem", config, calibration)
    stats = quantize_checkpoint(src, tmp_path / "stream", config, calibration=calibration, progress=False)
    _same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    assert stats["layers"] == 14 and stats["blocks"] == 2


def test_streamed_equals_in_memory_on_smollm2(tmp_path, smollm):
    from lowbit.app.models import _converted_dir

    model, tok = smollm  # makes sure the fp32 folder exists
    src = _converted_dir()
    _in_memory(src, tmp_path / "mem", lowbit.NF4Config(), tokenizer=tok)
    stats = quantize_checkpoint(src, tmp_path / "stream", lowbit.NF4Config(), tokenizer=tok, progress=False)
    _same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    assert stats["source_bytes"] > 500e6 and stats["written_bytes"] < stats["source_bytes"] / 3


def test_writer_shards_read_back_by_safetensors_aligned_for_memory_maps(tmp_path):
    tensors = {"a.codes": torch.arange(7, dtype=torch.uint8), "a.scale": torch.randn(3),
               "b.half": torch.randn(5).to(torch.bfloat16), "c.big": torch.arange(3, dtype=torch.int64),
               "d.flag": torch.tensor([True, False, True])}
    from lowbit.shards import ShardWriter

    w = ShardWriter(tmp_path, "t", 1 << 30, {"format": "pt"})
    for k, v in tensors.items():
        w.add(k, v)
    [shard] = w.finish(lambda i, n: "t.safetensors")
    assert shard["tensors"] == list(tensors)
    path = tmp_path / "t.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    _, mapped = map_tensors(str(path), path.stat().st_size)
    for k, v in tensors.items():
        assert torch.equal(mapped[k], v) and mapped[k].untyped_storage().data_ptr() == mapped["c.big"].untyped_storage().data_ptr()


# Bad input: one clear error, and nothing written.
def test_missing_shard_is_named(tmp_path):
    src = _random_folder(tmp_path / "src")
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names the shard {victim.name}, which is missing"):
        quantize_checkpoint(src, tmp_path / "out", "nf4", progress=False)
    assert not (tmp_path / "out").exists()


def test_index_entry_pointing_at_the_wrong_shard_is_named(tmp_path):
    src = _random_folder(tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"puts {name} in {files[1]}, which does not hold it"):
        quantize_checkpoint(src, tmp_path / "out", "nf4", progress=False)


def test_tensor_missing_from_the_index_is_named_and_nothing_is_left(tmp_path):
    src = _random_folder(tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="has no tensor model.norm.weight, which the model needs"):
        quantize_checkpoint(src, tmp_path / "out", "nf4", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_source_is_refused(tmp_path):
    src = _random_folder(tmp_path / "src")
    victim = sorted(src.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="is truncated"):
        quantize_checkpoint(src, tmp_path / "out", "nf4", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_destination_fails_clean_and_keeps_the_old_checkpoint(tmp_path):
    src = _random_folder(tmp_path / "src")
    out = tmp_path / "out"
    quantize_checkpoint(src, out, "int8", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.chmod(0o555)
    try:
        with pytest.raises(CheckpointError):
            quantize_checkpoint(src, out, "nf4", progress=False)
    finally:
        out.chmod(0o755)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("errno,message", [(28, "No space left on device"), (30, "Read-only file system")])
def test_failed_write_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch, errno, message):
    from lowbit.shards import ShardWriter

    src = _random_folder(tmp_path / "src")
    out = tmp_path / "out"
    quantize_checkpoint(src, out, "int8", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_add, n = ShardWriter.add, []

    def add(self, name, t):
        n.append(name)
        if len(n) == 20:
            raise OSError(errno, message)
        real_add(self, name, t)

    monkeypatch.setattr(ShardWriter, "add", add)
    with pytest.raises(CheckpointError, match=message):
        quantize_checkpoint(src, out, "nf4", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert lowbit.load(out).lowbit_config == lowbit.Int8Config()


def test_source_without_safetensors_is_refused(tmp_path):
    src = _random_folder(tmp_path / "src")
    for p in src.glob("model*.safetensors*"):
        p.unlink()
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        quantize_checkpoint(src, tmp_path / "out", "nf4", progress=False)


def test_reader_reads_every_tensor_as_safetensors_does(tmp_path):
    src = _random_folder(tmp_path / "src")
    with SafetensorsFolder(src) as folder:
        for shard in src.glob("model-*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                for k in f.keys():
                    assert torch.equal(folder.read(k), f.get_tensor(k)), k


def test_cli_streams_a_transformers_folder_and_matches_in_memory(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    src = _random_folder(tmp_path / "src")
    runner = CliRunner()
    streamed = runner.invoke(app, ["quantize", str(src), "--method", "int4", "--out", str(tmp_path / "s")])
    assert streamed.exit_code == 0, streamed.output
    assert "streamed in" in streamed.output and "peak RSS" in streamed.output
    _in_memory(src, tmp_path / "m", config_from_name("int4"))
    _same_checkpoint(tmp_path / "m", tmp_path / "s")


def test_mmap_load_gives_the_same_model_and_maps_the_file(tmp_path):
    src = _random_folder(tmp_path / "src")
    quantize_checkpoint(src, tmp_path / "q", "nf4", progress=False)
    x = torch.randint(0, 300, (1, 9))
    mapped, copied = lowbit.load(tmp_path / "q", mmap=True), lowbit.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(mapped(x).logits, copied(x).logits)
    layer = mapped.model.layers[0].self_attn.q_proj
    assert layer.weight_packed.untyped_storage().nbytes() > layer.weight_packed.numel()  # a view of the whole shard


def test_streamed_ternary_warns_as_the_in_memory_path_does(tmp_path):
    src = _random_folder(tmp_path / "src")
    with pytest.warns(UserWarning, match="ternary weights made post-training"):
        quantize_checkpoint(src, tmp_path / "t", "ternary", progress=False)
