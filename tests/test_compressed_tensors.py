"""compressed-tensors export (issue 15 item 4): the compressed-tensors library itself decompresses lowbit's int4 /
int8 pack-quantized folders to exactly the weights lowbit's layers hold, and transformers loads them."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.interop.compressed_tensors import export_compressed_tensors, pack_int32


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8])
def test_packing_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    for shape in [(5, 70), (3, 32), (1, 1)]:
        x = torch.randint(lo, hi, shape, dtype=torch.int8)
        assert torch.equal(pack_int32(x, bits), pack_to_int32(x, bits))
        assert torch.equal(pack_int32(x.t().contiguous(), bits).t(), pack_to_int32(x, bits, packed_dim=0))


def _decompress(folder, name):
    """One layer's weight as compressed-tensors' own decompressor rebuilds it from the folder."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    tensors = load_file(folder / "model.safetensors")
    local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    return PackedQuantizationCompressor.decompress(local, config.config_groups["group_0"])["weight"]


@pytest.mark.parametrize("qtype, config", [
    ("int4", lowbit.IntConfig(bits=4, group_size=64)),  # written from the layers' own codes
    ("int8", lowbit.IntConfig(bits=8, group_size=64)),
    ("int4", lowbit.GPTQConfig(bits=4, group_size=64, n_samples=4, seq_len=16)),
    ("int4", None),  # a full-precision model: rounded to nearest by lowbit first
], ids=["rtn4", "rtn8", "gptq4", "fp32"])
def test_compressed_tensors_decompresses_to_lowbits_weights(tmp_path, qtype, config):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = _tiny()
    if config is not None:
        calibration = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
        lowbit.quantize(model, config, progress=False,
                        calibration=calibration if isinstance(config, lowbit.GPTQConfig) else None)
    report = export_compressed_tensors(model, None, tmp_path / "ct", qtype, group_size=64)
    assert report["layers"] == 14 and report["from_codes"] == (0 if config is None else 14)
    reference = model if config is not None else lowbit.quantize(copy.deepcopy(_tiny()),
                                                                  lowbit.IntConfig(bits=4, group_size=64), progress=False)
    for name, layer in reference.named_modules():
        if isinstance(layer, lowbit.nn.IntLinear):
            assert torch.equal(_decompress(tmp_path / "ct", name), layer.dequantize()), name
    # transformers (through compressed-tensors) loads the folder and computes what lowbit computes.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, reference(ids).logits, atol=1e-4)


def test_bad_requests_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        export_compressed_tensors(_tiny(), None, tmp_path / "a", "int4", group_size=96)
    with pytest.raises(ValueError, match="int4, int8"):
        export_compressed_tensors(_tiny(), None, tmp_path / "b", "int3")
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="exists"):
        export_compressed_tensors(_tiny(), None, tmp_path / "c", "int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing half written


def test_export_command_on_the_bundled_model_writes_every_layer_from_its_codes(tmp_path):
    # SmolLM2's 576-wide rows take no groups of 128: the command picks 64 and quantizes with it.
    from typer.testing import CliRunner

    from lowbit.cli import app

    result = CliRunner().invoke(app, ["export", "smollm2-135m", "--format", "compressed-tensors", "--type", "int4",
                                      "--method", "rtn", "--out", str(tmp_path / "ct")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "group size 64" in text and "210 layers (210 from their own lowbit codes)" in text
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
