"""BitNet b1.58 training layers: straight-through gradients, the packed form, to_bitnet / pack_bitnet on a LLaMA."""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit import functional as F
from lowbit.nn import BitLinear, TrainableBitLinear
from lowbit.train import pack_bitnet, to_bitnet


def reference_quantized(layer: TrainableBitLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 input, ternary weight) as the packed path's primitives make them, from the normalised input."""
    xn = torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6)
    codes, absmax = F.quantize_activations_int8(xn)
    xq = F.dequantize_activations_int8(codes, absmax)
    packed, gamma = F.quantize_ternary(layer.weight.detach())
    wq = F.dequantize_ternary(packed, gamma, layer.weight.shape)
    return xq, wq


@pytest.fixture(params=[True, False], ids=["fused", "float"])
def fused(request, monkeypatch):
    """Each layer test on both forwards: the integer product and the float estimators around F.linear."""
    monkeypatch.setattr(TrainableBitLinear, "fused", request.param)
    return request.param


def test_straight_through_gradients(rng, fused):
    layer = TrainableBitLinear(96, 40, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 96, generator=rng) * 0.05)
        layer.weight[0, :8] = 3.0  # far outside the ternary range: the estimator still passes their gradient
    x = (torch.randn(3, 5, 96, generator=rng) * 4).requires_grad_()
    r = torch.randn(3, 5, 40, generator=rng)
    (layer(x) * r).sum().backward()

    xq, wq = reference_quantized(layer, x.detach())
    # dL/dW of the ternary weight, given to the latent weight unchanged: r^T xq.
    want_w = r.reshape(-1, 40).T @ xq.reshape(-1, 96)
    assert layer.weight.grad.shape == layer.weight.shape
    torch.testing.assert_close(layer.weight.grad, want_w, rtol=1e-5, atol=1e-5)
    assert (layer.weight.grad[0, :8] != 0).all()
    # dL/dx: the int8 rounding counts as the identity; the norm before it is differentiated.
    xr = x.detach().clone().requires_grad_()
    xn = torch.nn.functional.rms_norm(xr, (96,), eps=1e-6)
    (torch.nn.functional.linear(xn, wq) * r).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    # A step against the gradient lowers the loss the layer computes (the sign is right).
    with torch.no_grad():
        before = float((layer(x) * r).sum())
        layer.weight -= 1e-3 * layer.weight.grad
        assert float((layer(x) * r).sum()) < before


def test_training_forward_is_the_quantized_computation(rng, fused):
    layer = TrainableBitLinear(64, 32, bias=True)
    x = torch.randn(2, 7, 64, generator=rng) * 3
    xq, wq = reference_quantized(layer, x)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(xq, wq, layer.bias), rtol=1e-5, atol=1e-5)
    w = layer(x)
    assert not torch.allclose(w, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-2)  # it quantizes


def test_fused_and_float_forwards_agree_on_a_prefill_sized_batch(rng):
    # 600 rows: past the GEMV kernels, on the int8 GEMM. Same output and gradients as the float estimators, up to
    # float summation order (the integer sums are exact).
    layer = TrainableBitLinear(256, 96, bias=True)
    x = (torch.randn(4, 150, 256, generator=rng) * 2).requires_grad_()
    r = torch.randn(4, 150, 96, generator=rng)
    outs = []
    for mode in (True, False):
        layer.fused = mode
        layer.zero_grad()
        xx = x.detach().clone().requires_grad_()
        y = layer(xx)
        (y * r).sum().backward()
        outs.append((y.detach(), xx.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_layer_under_bf16_autocast_keeps_its_forward_and_rounds_only_the_backward(rng):
    # Under autocast the integer forward is unchanged (the codes come from the float input); the backward's two
    # products run in bf16, so the gradients move by bf16's rounding only.
    layer = TrainableBitLinear(256, 64, bias=False)
    x = (torch.randn(300, 256, generator=rng) * 2).requires_grad_()
    r = torch.randn(300, 64, generator=rng)
    y32 = layer(x)
    (y32 * r).sum().backward()
    gx32, gw32 = x.grad.clone(), layer.weight.grad.clone()
    x.grad, layer.weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    (y16.float() * r).sum().backward()
    assert torch.equal(y16.float(), y32)
    for got, want in ((x.grad, gx32), (layer.weight.grad, gw32)):
        assert got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("shape", [(64, 32), (200, 72), (30, 17)])
def test_packed_layer_gives_the_training_layer_outputs(rng, shape):
    k, n = shape
    layer = TrainableBitLinear(k, n, bias=n % 2 == 0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=rng) * 0.1)
    packed = layer.pack()
    assert isinstance(packed, BitLinear) and packed.input_norm and packed.bits_per_param() <= 2 + 64 / (k * n)
    for rows in (1, 9):
        x = torch.randn(rows, k, generator=rng) * 5
        want = layer(x)
        got = packed(x)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_packed_layer_trains_its_input_through_the_norm(rng):
    layer = TrainableBitLinear(48, 24, bias=False)
    packed = layer.pack()
    x1 = torch.randn(4, 48, generator=rng).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    r = torch.randn(4, 24, generator=rng)
    (layer(x1) * r).sum().backward()
    (packed(x2) * r).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama():
    from lowbit.train.model import build_model

    return build_model("tiny", 512, 64, 0, 1, seed=3)


def test_to_bitnet_and_pack_bitnet_on_a_llama(tiny_llama, rng):
    model = to_bitnet(copy.deepcopy(tiny_llama))
    trained = [n for n, m in model.named_modules() if isinstance(m, TrainableBitLinear)]
    assert len(trained) == 7 * 5 and not any("lm_head" in n for n in trained)  # the head stays full precision
    ids = torch.randint(0, 512, (2, 40), generator=rng)
    with torch.no_grad():
        want = model(ids, labels=ids)
        packed = pack_bitnet(copy.deepcopy(model))
        got = packed(ids, labels=ids)
    assert not any(isinstance(m, TrainableBitLinear) for m in packed.modules())
    assert sum(isinstance(m, BitLinear) for m in packed.modules()) == len(trained)
    assert abs(float(got.loss) - float(want.loss)) <= 1e-4 * float(want.loss)
    with pytest.raises(ValueError, match="no TrainableBitLinear"):
        pack_bitnet(copy.deepcopy(tiny_llama))


def test_packed_model_saves_and_loads_with_its_input_norms(tiny_llama, tmp_path, rng):
    import lowbit

    model = pack_bitnet(to_bitnet(copy.deepcopy(tiny_llama))).eval()
    lowbit.save(model, tmp_path / "m")
    back = lowbit.load(tmp_path / "m")
    assert all(m.input_norm for m in back.modules() if isinstance(m, BitLinear))
    ids = torch.randint(0, 512, (1, 30), generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)


def test_normed_bitlinear_cannot_pass_for_a_linear_layer(tiny_llama):
    """Where a layer is turned back into weights (merging, exports), the norm it applies would be lost: refused."""
    from lowbit.nn.base import check_plain_linear

    packed = TrainableBitLinear(32, 16).pack()
    with pytest.raises(ValueError, match="normalises its input"):
        check_plain_linear(packed, "layer")
    check_plain_linear(BitLinear.from_linear(torch.nn.Linear(32, 16)), "layer")
