"""bf16 prompt GEMMs (lowbit.kernels.fast_prefill): inside, a float32 quantized layer's many-row product is its
dequantized weight and the activations rounded to bf16 and multiplied by torch's bf16 GEMM; outside, float32."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.decode import StaticDecoder
from lowbit.kernels import fast_prefill, prefill_path

CONFIGS = {"nf4": lowbit.NF4Config(), "int4": lowbit.IntConfig(bits=4, group_size=32),
           "int8-weight": lowbit.Int8Config(weight_only=True)}


def layer_of(name: str, k: int = 640, n: int = 3000):
    # n * k * 4 bytes > 1 MiB: the tiled path; small layers take the dequantize-whole path (both are tested)
    torch.manual_seed(0)
    return lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(k, n)), CONFIGS[name], progress=False)[0]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(640, 3000), (192, 256)], ids=["tiled", "whole"])
def test_bf16_prompt_gemm_equals_its_emulation(name, shape, monkeypatch):
    monkeypatch.setenv("LOWBIT_PREFILL", "bf16")
    layer = layer_of(name, *shape)
    x = torch.randn(40, shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = layer(x)
        with fast_prefill():
            got = layer(x)
        assert torch.equal(layer(x), exact)  # outside, float32 again
        w = layer.dequantize()
        want = (torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float() + layer.bias.float())
    assert not torch.equal(got, exact)  # bf16 ran
    scale = x.abs() @ w.abs().t() + layer.bias.abs()  # the sums' magnitude
    assert ((got - want).abs() <= 2 ** -7 * scale).all()  # bf16 rounding of the output, sums in another order
    assert ((got - exact).abs() <= 2 ** -6 * scale).all()


def test_exact_choice_keeps_float32_inside(monkeypatch):
    monkeypatch.setenv("LOWBIT_PREFILL", "exact")
    layer = layer_of("nf4")
    x = torch.randn(40, 640)
    with torch.no_grad(), fast_prefill():
        assert torch.equal(layer(x), layer.quantized_forward(x)) and prefill_path() == "exact"
    with torch.no_grad():
        assert torch.equal(layer(x), layer.quantized_forward(x))


def test_decoder_prompt_runs_inside_and_steps_outside(monkeypatch):
    import transformers

    monkeypatch.setenv("LOWBIT_PREFILL", "bf16")
    monkeypatch.setenv("LOWBIT_DECODE_ACTIVATIONS", "float32")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = lowbit.quantize(transformers.LlamaForCausalLM(config).eval(), lowbit.NF4Config(), progress=False)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    fast = StaticDecoder(model, 1, 24).forward(ids)
    monkeypatch.setenv("LOWBIT_PREFILL", "exact")
    exact = StaticDecoder(model, 1, 24).forward(ids)
    assert not torch.equal(fast, exact)
    torch.testing.assert_close(fast, exact, rtol=0.05, atol=0.05 * float(exact.abs().max()))


def test_bad_choice_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LOWBIT_PREFILL", "fp8")
    with pytest.raises(ValueError, match="LOWBIT_PREFILL='fp8': expected one of auto, bf16, exact"):
        prefill_path()
