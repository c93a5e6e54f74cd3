"""The compiled matmul kernels equal their plain-torch references, on odd shapes, decode and prefill sizes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit import kernels
from lowbit.kernels import matmul, reference
from lowbit.calibrate.spqr import spqr_quantize
from lowbit.nn import BitLinear, Int8Linear, IntLinear, Linear4bit, SpQRLinear

# Every test here runs once per kernel build and prefill GEMM dtype this CPU can run (conftest.forced_path).
pytestmark = [pytest.mark.usefixtures("forced_path"),
              pytest.mark.skipif(kernels.fast() is None, reason="C++ kernels not built")]

ROWS = (1, 3, 8, 9, 40)  # GEMV sizes, and past GEMV_MAX_ROWS the tiled prefill path


def _linear(n: int, k: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[:, 3] *= 8  # a heavy column, like the outlier features of real models
    return lin


def _compare(layer: torch.nn.Module, k: int, dtype: torch.dtype) -> None:
    for m in ROWS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        with torch.no_grad():
            fast = layer(x)
            with kernels.reference_only():
                ref = layer(x)
        assert fast.dtype == ref.dtype == dtype and fast.shape == ref.shape
        tol = 1e-5 if dtype == torch.float32 and layer.compute_dtype == torch.float32 else 2e-2
        err = (fast.float() - ref.float()).abs().max() / ref.float().abs().max()
        assert err <= tol, f"rows {m}: relative error {err:.2e}"


def _spqr(lin: torch.nn.Linear, bits: int, stat_group: int = 16) -> SpQRLinear:
    """SpQR of the layer on correlated synthetic inputs, with a loose outlier threshold so that rows hold several."""
    k = lin.in_features
    g = torch.Generator().manual_seed(k)
    x = torch.randn(k, 2 * k, generator=g) + torch.randn(1, 2 * k, generator=g)
    q = spqr_quantize(lin.weight.detach(), 2 * x @ x.T / x.shape[1], bits, 16, 3, stat_group, 3.0, 0.03, 0.01)
    layer = SpQRLinear.from_spqr(q, lin.bias, bits, 16, stat_group)
    assert layer.num_outliers() > lin.out_features
    return layer


LUT_LAYERS = {
    "nf4": lambda lin: Linear4bit.from_linear(lin, "nf4", 64),
    "nf4-dq": lambda lin: Linear4bit.from_linear(lin, "nf4", 64, double_quant=True),
    "fp4-dq": lambda lin: Linear4bit.from_linear(lin, "fp4", 64, double_quant=True),
    # NF4Config(quant_type="int4")'s layer: an IntLinear with float32 scales since the format registry (issue 33)
    "int4-g64": lambda lin: IntLinear.from_linear(lin, 4, 64, scale_dtype="float32"),
    "int4-gptq-g128": lambda lin: IntLinear.from_linear(lin, 4, 128),
    "int2-g16": lambda lin: IntLinear.from_linear(lin, 2, 16),
    "int2-g256": lambda lin: IntLinear.from_linear(lin, 2, 256),
    "int3-gptq-g128": lambda lin: IntLinear.from_linear(lin, 3, 128),
    "int3-g64": lambda lin: IntLinear.from_linear(lin, 3, 64),
    "spqr3-b16": lambda lin: _spqr(lin, 3),
    "spqr4-b16-stats32": lambda lin: _spqr(lin, 4, 32),
}


@pytest.mark.parametrize("name", list(LUT_LAYERS))
@pytest.mark.parametrize("n,k", [(37, 576), (130, 256), (9, 1152)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lut_layers_fast_equals_reference(name, n, k, dtype):
    layer = LUT_LAYERS[name](_linear(n, k))
    if dtype == torch.bfloat16:
        layer.compute_dtype = torch.bfloat16
    assert layer.lut_weight() is not None and layer.lut_weight().fits_kernel()
    _compare(layer, k, dtype)


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "int4-g64", "int4-gptq-g128", "int2-g16", "int2-g256"])
@pytest.mark.parametrize("k", [576, 320])  # 320: a partly padded last chunk
def test_bf16_dot_kernel_equals_a_bf16_rounded_reference(name, k):
    # Builds with AVX512_BF16 run bf16-compute GEMVs of 4- and 2-bit codes on the bf16-dot kernel: x and the code
    # table rounded to bf16, float32 sums. The reference rounds the same two things and multiplies in float32.
    if not kernels.fast().bf16_dot:
        pytest.skip("this build has no bf16-dot kernel")
    layer = LUT_LAYERS[name](_linear(37, k))
    layer.compute_dtype = torch.bfloat16
    w = layer.lut_weight()
    rounded = dataclasses.replace(w, lut=w.lut.bfloat16().float())
    call = layer.decode_call()
    for m in (1, 3, 5, 8):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        with torch.no_grad():
            got, forward = call(x), layer(x)
        want = reference.lut_linear(x.bfloat16().float(), rounded, torch.float32, layer.bias)
        assert torch.equal(got, forward)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        # and it is not the float32 kernel: rounding x to bf16 moves the outputs by about 1e-3
        exact = reference.lut_linear(x, w, torch.float32, layer.bias)
        assert (got - exact).abs().max() > 1e-4 * exact.abs().max()


def test_plans_and_one_call_for_several_weights_equal_the_layers():
    # A decode loop binds each weight once (LutPlan) and runs q/k/v in one call: each output is the layer's own.
    ext = kernels.fast()
    layers = [LUT_LAYERS[name](_linear(n, 576, seed)) for seed, (name, n) in
              enumerate([("nf4", 37), ("spqr4-b16-stats32", 20), ("int2-g16", 9), ("int3-g64", 50)])]
    layers[0].compute_dtype = torch.bfloat16  # the bf16-dot kernel where the build has it, beside float32 ones
    plans = [layer.decode_plan() for layer in layers]
    for m in (1, 3, 8):
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m))
        many = ext.lut_gemv_many(plans, x)
        for layer, plan, y in zip(layers, plans, many):
            with torch.no_grad():
                assert torch.equal(plan.gemv(x), y) and torch.equal(y + layer.bias.float(), layer(x))
    other_k = LUT_LAYERS["nf4"](_linear(8, 320)).decode_plan()
    with pytest.raises(RuntimeError, match="share K"):
        ext.lut_gemv_many([plans[0], other_k], x)


@pytest.mark.parametrize("name", ["int4-g64", "int4-gptq-g128", "int2-g16", "int3-gptq-g128", "spqr3-b16"])
def test_partial_last_group(name):
    # 200 columns: the last group is partial; the kernel pads x with zeros past the row.
    layer = LUT_LAYERS[name](_linear(21, 200))
    assert layer.lut_weight().fits_kernel()
    _compare(layer, 200, torch.float32)


def test_reference_lut_dequantize_equals_layers():
    lin = _linear(48, 320)
    for build in LUT_LAYERS.values():
        layer = build(lin)
        got = reference.lut_dequantize(layer.lut_weight())
        torch.testing.assert_close(got, layer.dequantize(), rtol=1e-6, atol=1e-7)


def test_layouts_the_kernels_do_not_take_fall_back_correctly():
    # NF4 blocks run over the flat weight: with 100 columns they straddle rows.
    nf4 = Linear4bit.from_linear(_linear(16, 100), "nf4", 64)
    assert nf4.lut_weight() is None
    _compare(nf4, 100, torch.float32)
    odd_group = IntLinear.from_linear(_linear(16, 96), 4, 24)  # 24 neither divides nor is a multiple of 128
    assert not odd_group.lut_weight().fits_kernel()
    _compare(odd_group, 96, torch.float32)
    three_bit = IntLinear.from_linear(_linear(16, 100), 3, 4)  # rows do not start on a 24-bit word
    assert not three_bit.lut_weight().fits_kernel()
    _compare(three_bit, 100, torch.float32)
    eight_bit = IntLinear.from_linear(_linear(16, 128), 8, 64)
    assert eight_bit.lut_weight() is None
    _compare(eight_bit, 128, torch.float32)


def test_spqr_outliers_replace_the_coded_weight():
    # The kernel adds (outlier - coded weight) * x: check against a dense matmul with the outliers written in.
    layer = _spqr(_linear(24, 256), 3)
    w = layer.dense_part()
    rows, cols = layer.outlier_rows(), layer.outlier_cols.long()
    assert (w[rows, cols] != layer.outlier_values.float()).all()
    w[rows, cols] = layer.outlier_values.float()
    x = torch.randn(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [64, 200, 4096 + 16])
def test_int8_int8_is_exact(k):
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(-127, 128, (33, k), dtype=torch.int8, generator=g)
    for m in (1, 4, 8):
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        got = matmul.int8_int8(xq, codes, codes.sum(1, dtype=torch.int32))
        assert torch.equal(got, torch._int_mm(xq, codes.t()))


@pytest.mark.parametrize("k", [16, 200, 4096 + 7])
def test_float_gemv_equals_linear(k):
    w = torch.randn(37, k, generator=torch.Generator().manual_seed(k))
    for m in (1, 3, 8):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        # another summation order than torch's GEMV: equal to float rounding
        torch.testing.assert_close(kernels.fast().float_gemv(x, w), x @ w.t(), rtol=1e-5, atol=1e-5 * k ** 0.5)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.fast().float_gemv(torch.randn(1, k), w.t().contiguous().t())


@pytest.mark.parametrize("k", [64, 300, 1028])
def test_ternary_is_exact(k):
    layer = BitLinear.from_linear(_linear(19, k))
    g = torch.Generator().manual_seed(k)
    for m in (1, 5, 8, 40):  # GEMV, and tiles of unpacked rows
        xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        got = matmul.ternary_int8(xq, layer.weight_packed, 19, layer.trits)
        assert torch.equal(got, torch._int_mm(xq, layer.trits().t()))


@pytest.mark.parametrize("mode", ["weight-only", "llm-int8", "llm-int8-zp"])
def test_int8_layers_fast_equals_reference(mode):
    lin = _linear(70, 200)
    layer = Int8Linear.from_linear(lin, threshold=6.0, weight_only=mode == "weight-only",
                                   activations="zeropoint" if mode.endswith("zp") else "absmax")
    _compare(layer, 200, torch.float32)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("activations", ["absmax", "zeropoint"])
def test_fused_llm_int8_equals_torch_ops(rows, activations):
    # The fused decode call against the torch-op path, with outlier feature columns split out (|x| >= 6).
    layer = Int8Linear.from_linear(_linear(70, 200), threshold=6.0, activations=activations)
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(rows))
    x[:, 3] *= 10
    x[0, 17] = -7.5
    assert ((x.abs() >= 6).any(0)).sum() >= 2
    with torch.no_grad():
        fast = layer(x)
        with kernels.reference_only():
            ref = layer(x)
        exact = layer(x, reference=True)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)
    # the layer's output is the fused call's (not a fallback to the torch ops)
    fused = matmul.q8_gemv(x, layer.weight_codes, layer._code_sums(), (layer.weight_absmax / 127).float(), 6.0, 70,
                           zero_point=activations == "zeropoint")
    assert fused is not None and torch.equal(layer._finish(fused[0], torch.float32), fast)
    x[0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"), torch.no_grad():
        layer(x)


def test_bitlinear_fast_equals_reference():
    layer = BitLinear.from_linear(_linear(70, 576))
    _compare(layer, 576, torch.float32)
    x = torch.randn(2, 576)
    x[1, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"), torch.no_grad():
        layer(x)


def test_autograd_takes_the_differentiable_path():
    layer = Linear4bit.from_linear(_linear(16, 128), "nf4", 64)
    x = torch.randn(2, 128, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)


def test_spqr_outlier_columns_out_of_range_raise():
    layer = _spqr(_linear(24, 256), 3)
    layer.outlier_cols[5] = 256 + 40  # a corrupt file: the kernel must not read past x
    for rows in (1, 40):  # the GEMV and the tiled prefill
        with pytest.raises(RuntimeError, match="out of range"), torch.no_grad():
            layer(torch.randn(rows, 256))
