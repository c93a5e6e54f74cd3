"""The int8-activation kernels of the native decode step: x quantized per block of 8, 4-bit codes as integers.

Each kernel's output must equal the plain-torch emulation of its arithmetic (lowbit.kernels.reference
.lut_linear_int8x) within float32 summation order, and the decode step on it must stay close to the exact one.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.app.models import load_native
from lowbit.decode import StaticDecoder
from lowbit.decode.native import int8_activations
from lowbit.kernels import fast, reference
from lowbit.kernels.matmul import lut_plan

pytestmark = pytest.mark.skipif(fast() is None or not hasattr(fast().LutPlan, "takes_int8_x"),
                                reason="no compiled kernels")


def vnni() -> bool:
    """Whether the kernels that run have VNNI (the builds with the int8-activation kernel)."""
    return fast().compiled_isa() in ("avx512_vnni", "avx512_bf16")


CONFIGS = {"nf4-dq": lowbit.NF4Config(), "nf4": lowbit.NF4Config(double_quant=False),
           "fp4": lowbit.NF4Config(quant_type="fp4"), "int4-g32": lowbit.IntConfig(bits=4, group_size=32),
           "int4-g64": lowbit.NF4Config(quant_type="int4"), "nf4-b128": lowbit.NF4Config(blocksize=128)}


def layer_of(name: str, k: int, n: int = 80):
    torch.manual_seed(0)
    model = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(k, n)), CONFIGS[name], progress=False)
    return model[0]


# widths: one chunk of 128 codes, a part chunk, SmolLM2's 576, and 640 (blocks of 128 need a multiple of 128)
CASES = [(name, k) for name in CONFIGS for k in ((128, 640) if name == "nf4-b128" else (128, 192, 576, 640))]


@pytest.mark.parametrize("name, k", CASES)
def test_kernel_equals_its_emulation(name, k):
    layer = layer_of(name, k)
    w = layer.lut_weight()
    plan = lut_plan(fast(), w, torch.float32)
    if not plan.takes_int8_x():
        assert not vnni()  # the VNNI builds take every 4-bit plan
        pytest.skip("this build has no int8-activation kernel")
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    x[0, 5], x[1, :16] = 40.0, 0.0  # an outlier's block, and blocks of zeros (scale 0)
    got = plan.gemv_int8x(x).double()
    want = reference.lut_linear_int8x(x, w)
    magnitude = x.abs().double() @ reference.lut_dequantize(w).abs().double().t()  # the sums' scale
    assert ((got - want).abs() <= 1e-5 * magnitude + 1e-6).all()
    # and it is an approximation of the exact product, not something else
    exact = reference.lut_linear(x, w, torch.float32).double()
    assert ((got - exact).abs() <= 0.05 * magnitude).all()


def test_gguf_q4_1_codes_are_exact_integers():
    # Q4_1's codes 0..15 need no codebook rounding: the only change from the exact path is x's rounding, so with
    # x already on an int8 grid per block the kernel is exact.
    model, _ = load_native("smollm2-135m", progress=False)
    layer = model.model.layers[0].mlp.down_proj
    w = layer.lut_weight()
    plan = lut_plan(fast(), w, torch.float32)
    if not plan.takes_int8_x():
        pytest.skip("this build has no int8-activation kernel")
    table, mult = reference.int8_codebook(w.lut)
    assert mult == 1.0 and torch.equal(table, w.lut.double())
    x = torch.randint(-127, 128, (2, layer.in_features)).float() * 0.01
    x[:, ::reference.X_BLOCK] = 1.27  # every block's max: d = 0.01, so x / d is an integer
    exact = reference.lut_linear(x, w, torch.float32).double()
    got = plan.gemv_int8x(x).double()
    magnitude = x.abs().double() @ reference.lut_dequantize(w).abs().double().t()
    assert ((got - exact).abs() <= 1e-5 * magnitude).all()


def test_decode_step_on_int8_activations_stays_close_and_answers(smollm, monkeypatch):
    model, tok = smollm
    model = lowbit.quantize(copy.deepcopy(model), lowbit.NF4Config(), progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    logits = {}
    for path in ("float32", "int8"):
        monkeypatch.setenv("LOWBIT_DECODE_ACTIVATIONS", path)
        decoder = StaticDecoder(model, 1, ids.shape[1] + 4)
        assert decoder.native is not None
        decoder.forward(ids[:, :-1])
        logits[path] = decoder.forward(ids[:, -1:])  # one native step
    a, b = logits["float32"], logits["int8"]
    if not vnni():
        assert torch.equal(a, b)  # no int8 kernel: the float32 path ran both times
    else:
        assert not torch.equal(a, b)  # the int8 kernels ran
        assert a.argmax() == b.argmax()
        # close: the softmax distributions' KL divergence is small
        kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum")
        assert float(kl) < 0.02
    monkeypatch.setenv("LOWBIT_DECODE_ACTIVATIONS", "int8")
    out = lowbit.generate(model, ids, max_new_tokens=12)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_bad_activation_choice_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LOWBIT_DECODE_ACTIVATIONS", "int4")

    with pytest.raises(ValueError, match="LOWBIT_DECODE_ACTIVATIONS='int4': expected one of auto, int8, float32"):
        int8_activations()
