"""Backward through frozen quantized weights: x's gradient equals dy @ dequantize(), nothing weight-sized is saved."""
from __future__ import annotations

import pytest
import torch

from lowbit.nn import BitLinear, Int8Linear
from test_matmul_kernels import LUT_LAYERS, _linear

# Every test here runs once per kernel build and prefill GEMM dtype this CPU can run (conftest.forced_path).
pytestmark = pytest.mark.usefixtures("forced_path")

LAYERS = {
    **LUT_LAYERS,
    "int8 (LLM.int8)": lambda lin: Int8Linear.from_linear(lin),
    "int8 zero-point": lambda lin: Int8Linear.from_linear(lin, activations="zeropoint"),
    "int8 weight-only": lambda lin: Int8Linear.from_linear(lin, weight_only=True),
    "int8 bf16 compute": lambda lin: Int8Linear.from_linear(lin, weight_only=True, compute_dtype=torch.bfloat16),
    "ternary": lambda lin: BitLinear.from_linear(lin),
    "ternary k%4": lambda lin: BitLinear.from_linear(lin),
}


def inputs_with_outlier_column(m: int, k: int) -> torch.Tensor:
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(7))
    x[..., 5] = 20.0  # an emergent-feature-like column, above LLM.int8's threshold
    return x.requires_grad_(True)


# The default backward tile holds these layers' whole weight; 4 KiB tiles (at most 16 rows) cover accumulation.
@pytest.mark.parametrize("rows, tile_bytes", [(3, None), (24, None), (24, 4096)])
@pytest.mark.parametrize("name", list(LAYERS))
def test_input_gradient_is_dy_times_dequantized_weight(name, rows, tile_bytes, monkeypatch):
    if tile_bytes:
        monkeypatch.setattr("lowbit.nn.base.BACKWARD_TILE_BYTES", tile_bytes)
    k = 254 if name == "ternary k%4" else 576
    layer = LAYERS[name](_linear(130, k))
    x = inputs_with_outlier_column(rows, k)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []  # not the input, not a dequantized weight: the packed buffers are all backward needs
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the same forward as inference
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    want = dy.double().reshape(-1, 130) @ layer.dequantize().double()
    got = x.grad.reshape(-1, k).double()
    tol = 1e-2 if layer.compute_dtype == torch.bfloat16 else 1e-5
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tol, f"relative error {err:.2e}"
    assert (got[:, 5].abs() > 0).all() and (got[:, :5].abs() > 0).all()  # every column gets a gradient


def test_gradient_flows_through_a_quantized_model_with_checkpointing():
    import lowbit
    from test_checkpoint import tiny_llama

    model = lowbit.quantize(tiny_llama(), lowbit.NF4Config(), progress=False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
