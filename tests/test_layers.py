import pytest
import torch
from torch import nn

import lowbit
import lowbit.functional as F
from lowbit.nn import BitLinear, Int8Linear, IntLinear, Linear4bit

# Every test here runs once per kernel build and prefill GEMM dtype this CPU can run (conftest.forced_path).
pytestmark = pytest.mark.usefixtures("forced_path")


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(200, 96)


def test_int8_matches_float64_reference_and_decomposes_outliers(linear):
    x = torch.randn(3, 7, 200)
    x[..., 5] *= 20  # a planted outlier feature
    layer = Int8Linear.from_linear(linear, threshold=6.0)
    fast, ref = layer(x), layer(x, reference=True)
    assert torch.allclose(fast, ref, atol=1e-5)
    # Decomposition: column 5 goes through float; without it, the int8 error is far larger.
    exact = linear(x)
    err6 = (fast - exact).norm() / exact.norm()
    err0 = (Int8Linear.from_linear(linear, threshold=0.0)(x) - exact).norm() / exact.norm()
    assert err6 < err0 / 2 and err6 < 0.02


def test_int8_weight_only_equals_dequantized_weight(linear):
    layer = Int8Linear.from_linear(linear, weight_only=True)
    x = torch.randn(4, 200)
    assert torch.allclose(layer(x), nn.functional.linear(x, layer.dequantize(), linear.bias), atol=1e-5)
    assert not any(t.dtype == torch.float32 and t.shape == linear.weight.shape for t in layer.buffers())


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int4", False)])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_matches_its_dequantized_weight(linear, quant_type, double_quant, compute_dtype):
    # "int4" is NF4Config's uniform variant, an IntLinear with float32 scales since the format registry (issue 33)
    layer = (IntLinear.from_linear(linear, 4, 64, compute_dtype, scale_dtype="float32") if quant_type == "int4" else
             Linear4bit.from_linear(linear, quant_type, 64, double_quant, compute_dtype))
    x = torch.randn(5, 200)
    expected = nn.functional.linear(x.to(compute_dtype), layer.dequantize(compute_dtype)).float() + linear.bias
    assert torch.allclose(layer(x), expected.to(x.dtype), atol=1e-2 if compute_dtype == torch.bfloat16 else 1e-5)
    rel = (layer.dequantize() - linear.weight).norm() / linear.weight.norm()
    assert rel < 0.15


def test_linear4bit_nf4_bits_and_storage(linear):
    layer = Linear4bit.from_linear(linear, "nf4", 64, double_quant=False)
    assert layer.bits_per_param() == pytest.approx(4.5 + 16 * 32 / (200 * 96))  # + the 16-entry codebook
    q = F.quantize_4bit(linear.weight.detach(), "nf4", 64)
    assert torch.equal(layer.weight_packed, q.codes)


def test_bitlinear_is_b158(linear):
    layer = BitLinear.from_linear(linear)
    t = layer.trits()
    assert set(t.unique().tolist()) <= {-1, 0, 1}
    x = torch.randn(6, 200)
    xq, absmax = F.quantize_activations_int8(x)
    expected = (xq.double() @ t.double().t()) * (absmax.double() / 127).unsqueeze(1) * float(layer.weight_gamma)
    assert torch.allclose(layer(x), expected.float() + linear.bias, atol=1e-4)


def test_quantize_sequential_mlp_and_skip():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(8, 64)
    before = mlp(x)
    lowbit.quantize(mlp, lowbit.NF4Config(skip=("4",)), progress=False)
    assert isinstance(mlp[0], Linear4bit) and isinstance(mlp[2], Linear4bit) and isinstance(mlp[4], nn.Linear)
    assert (mlp(x) - before).norm() / before.norm() < 0.2
    with pytest.raises(ValueError, match="already quantized"):
        lowbit.quantize(mlp, lowbit.Int8Config())


def test_quantize_gpt2_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)).eval()
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        conv = model.transformer.h[0].attn.c_attn
        lowbit.quantize(model, lowbit.Int8Config(weight_only=True), progress=False)
        layer = model.transformer.h[0].attn.c_attn
        assert isinstance(layer, Int8Linear) and layer.in_features == 64 and layer.out_features == 192
        assert torch.allclose(layer.dequantize(), conv.weight.t(), atol=float(conv.weight.abs().max()) / 127)
        after = model(ids).logits
    assert (after - before).norm() / before.norm() < 0.02
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_config_json_roundtrip():
    for cfg in (lowbit.Int8Config(threshold=4.0), lowbit.NF4Config(blocksize=128, compute_dtype=torch.bfloat16),
                lowbit.TernaryConfig(skip=("a.*",))):
        assert lowbit.config_from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown quantization method"):
        lowbit.config_from_dict({"method": "int3"})
    with pytest.raises(ValueError, match="no field"):
        lowbit.config_from_dict({"method": "int8", "blocksize": 3})


def test_real_model_generates_and_reports_memory(smollm):
    import copy

    model, tok = smollm
    m = lowbit.quantize(copy.deepcopy(model), lowbit.NF4Config(double_quant=True), progress=False)
    assert isinstance(m.model.layers[0].mlp.down_proj, Linear4bit)
    assert type(m.lm_head) is nn.Linear and m.lm_head.weight is m.model.embed_tokens.weight  # tied, untouched
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = tok.decode(m.generate(ids, max_new_tokens=4, do_sample=False)[0][ids.shape[1]:])
    assert "Paris" in out
    r = lowbit.memory_report(m)
    assert r["parameters"] == sum(p.numel() for p in model.parameters())
    assert r["total_bytes"] < r["fp32_bytes"] / 2.5 and "Linear4bit" in r["bytes_by_type"]


@torch.no_grad()
def test_int8_zeropoint_activations(linear):
    # Post-ReLU style inputs (all >= 0): absmax wastes the negative half of int8, zero-point does not.
    x = torch.rand(6, 200) * 3
    exact = linear(x)
    zp = Int8Linear.from_linear(linear, threshold=6.0)  # zero-point is the default
    am = Int8Linear.from_linear(linear, threshold=6.0, activations="absmax")
    assert zp.activations == "zeropoint"
    assert torch.allclose(zp(x), zp(x, reference=True), atol=1e-5)
    exact = exact.detach()
    err = lambda layer: float((layer(x) - exact).norm() / exact.norm())
    assert err(zp) < err(am) < 0.01
    # Outliers still take the float path with zero-point activations.
    x[:, 7] = 40.0
    assert float((zp(x) - linear(x)).norm() / linear(x).norm()) < 0.01
    with pytest.raises(ValueError, match="activations"):
        Int8Linear(8, 8, activations="minmax")
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear(8, 8, threshold=-1)


def test_config_modules_patterns():
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 16), nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)), nn.Linear(16, 4))

    m = lowbit.quantize(mlp(), lowbit.Int8Config(modules=("1",)), progress=False)  # a container: the linears under it
    assert isinstance(m[1][0], Int8Linear) and isinstance(m[1][2], Int8Linear) and type(m[2]) is nn.Linear
    m = lowbit.quantize(mlp(), lowbit.Int8Config(modules=("1.*",)), progress=False)  # GELU matched too: no parameters, fine
    assert isinstance(m[1][2], Int8Linear)
    with pytest.raises(TypeError, match="0 is Embedding, not a linear layer"):
        lowbit.quantize(mlp(), lowbit.NF4Config(modules=("0", "2")), progress=False)
    with pytest.raises(ValueError, match="matches no module"):
        lowbit.quantize(mlp(), lowbit.NF4Config(modules=("decoder.*",)), progress=False)
    cfg = lowbit.Int8Config(modules=("1.*",), activations="zeropoint")
    assert lowbit.config_from_json(cfg.to_json()) == cfg
