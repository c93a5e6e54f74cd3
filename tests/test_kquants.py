"""llama.cpp's K-quant types Q4_K and Q6_K in lowbit (issue 35): the layouts read by the gguf package's decoder
(written independently of lowbit), the stored values' ranges, the weighted search against plain rounding, GPTQ on
the K grids, and BlockLinear / GGUF export of them with llama.cpp's fallback where rows of 256 do not tile."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize
from hypothesis import given, settings, strategies as st

from lowbit.calibrate.gptq_blocks import gptq_blocks
from lowbit.formats import kquants
from lowbit.interop.gguf import load_gguf, read
from lowbit.interop.gguf_export import export_gguf
from lowbit.nn import BlockLinear
from test_gguf import tiny_model, tok  # noqa: F401 - tok: the fixture, a 320-token BPE tokenizer


def _weights(seed: int, rows: int = 12, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
    w[0, :256] = 0  # a super-block of zeros
    w[1, 32:64] = 0.25  # a constant sub-block
    w[2, 7] = 60.0  # an outlier that sets its sub-block's scale
    w[3, :256] = w[3, :256].abs()  # an all-positive super-block: q4_k's min is clamped at 0
    w[4, 256:] = -w[4, 256:].abs()
    return w


@pytest.mark.parametrize("name", list(kquants.TYPES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_layout_is_what_the_gguf_package_decodes(name, seed):
    t = kquants.TYPES[name]
    w = _weights(seed)
    blocks = kquants.search(t, w)
    data = kquants.pack(blocks)
    assert data.shape == (w.shape[0], w.shape[1] // 256 * t.bytes)
    theirs = dequantize(data.numpy(), getattr(GGMLQuantizationType, name.upper())).reshape(w.shape)
    np.testing.assert_array_equal(theirs, blocks.dequantize().numpy())
    back = kquants.unpack(t, data, w.shape[1])
    assert torch.equal(back.codes, blocks.codes) and torch.equal(back.sc, blocks.sc) and torch.equal(back.d, blocks.d)


@pytest.mark.parametrize("name", list(kquants.TYPES))
def test_stored_values_stay_in_their_ranges_and_zeros_stay_zero(name):
    t = kquants.TYPES[name]
    b = kquants.search(t, _weights(3))
    assert int(b.codes.max()) <= t.qmax
    lo, hi = (0, 63) if t.has_min else (-128, 127)
    assert lo <= int(b.sc.min()) and int(b.sc.max()) <= hi
    if t.has_min:
        assert 0 <= int(b.mn.min()) and int(b.mn.max()) <= 63
    assert torch.equal(b.dequantize()[0, :256], torch.zeros(256))


@pytest.mark.parametrize("name", list(kquants.TYPES))
def test_error_is_near_the_plain_grid_of_the_same_bits(name):
    # The stored scales cost little: the K type's error is within 15% of the same code grid with a free float scale
    # (and min) per sub-block, which is what the integer sub-block scales approximate.
    t = kquants.TYPES[name]
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    err = (kquants.search(t, w).dequantize() - w).square().mean()
    x = w.reshape(-1, t.sub)
    if t.has_min:
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        s = (hi - lo) / t.qmax
        free = (torch.round((x - lo) / s) * s + lo - x).square().mean()
    else:
        s = x.abs().amax(1, keepdim=True) / (t.offset - 1)
        free = (torch.round(x / s).clamp(-t.offset, t.qmax - t.offset) * s - x).square().mean()
    assert err < 1.15 * free, (float(err), float(free))
    expected_bits = {"q4_k": 4.5, "q6_k": 6.5625}[name]
    assert t.bits_per_weight == expected_bits


@pytest.mark.parametrize("name", list(kquants.TYPES))
def test_gptq_on_the_k_grid_lowers_the_output_error(name):
    # Correlated inputs: GPTQ's compensation lowers the output error ||X W^T - X Q^T|| that rounding leaves.
    g = torch.Generator().manual_seed(1)
    t = kquants.TYPES[name]
    X = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g))
    W = torch.randn(48, 256, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    gptq = gptq_blocks(W, H, t)
    rtn = kquants.search(t, W, torch.diag(H))
    # GPTQ keeps the sweep's fixed scales: the same d, sc (and dmin, mn) as the weighted search...
    assert torch.equal(gptq.d, rtn.d) and torch.equal(gptq.sc, rtn.sc)
    err = lambda b: float((X @ (b.dequantize() - W).T).square().mean())  # noqa: E731
    assert err(gptq) < 0.8 * err(rtn), (err(gptq), err(rtn))  # ... and chooses codes that err less on the outputs
    # its bytes are a valid layout of the type
    np.testing.assert_array_equal(
        dequantize(kquants.pack(gptq).numpy(), getattr(GGMLQuantizationType, name.upper())).reshape(W.shape),
        gptq.dequantize().numpy())


def test_block_linear_holds_k_types_and_refuses_rows_they_do_not_tile():
    lin = torch.nn.Linear(512, 24)
    layer = BlockLinear.from_linear(lin, "q4_k")
    assert layer.weight_blocks.shape == (24, 2 * 144)
    x = torch.randn(3, 512)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T + lin.bias, rtol=1e-5, atol=1e-5)
    assert float((layer.dequantize() - lin.weight).abs().max()) < 0.1 * float(lin.weight.abs().max())
    with pytest.raises(ValueError, match="multiple of 256"):
        BlockLinear.from_linear(torch.nn.Linear(576, 8), "q6_k")


@pytest.mark.parametrize("name", list(kquants.TYPES))
def test_gptq_k_codes_go_into_the_gguf_file_and_untiled_rows_fall_back_as_llama_cpp_does(tmp_path, tok, name):  # noqa: F811
    # hidden 64 (rows no K type tiles), intermediate 256: only down_proj's rows hold whole super-blocks.
    import lowbit

    base = tiny_model(hidden=64, intermediate=256)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    model = lowbit.quantize(base, f"gptq-{name}", calibration=ids, progress=False)
    kinds = {n: m.block_type for n, m in model.named_modules() if isinstance(m, BlockLinear)}
    fallback = {"q4_k": "q5_0", "q6_k": "q8_0"}[name]
    assert {n: k for n, k in kinds.items() if n.endswith("down_proj")} == {f"model.layers.{i}.mlp.down_proj": name
                                                                            for i in range(2)}
    assert {k for n, k in kinds.items() if not n.endswith("down_proj")} == {fallback}
    report = export_gguf(model, tok, tmp_path / "k.gguf", name, progress=False)
    assert report["from_codes"] == 14 and report["types"] == {fallback: 12}
    tensors = {t.name: t for t in read(tmp_path / "k.gguf").tensors}
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type.name == name.upper()
    layer = model.model.layers[1].mlp.down_proj
    assert np.array_equal(np.asarray(down.data).reshape(layer.out_features, -1), layer.weight_blocks.numpy())
    back, _ = load_gguf(tmp_path / "k.gguf", progress=False)  # read back: the same bytes in a BlockLinear
    again = back.model.layers[1].mlp.down_proj
    assert isinstance(again, BlockLinear) and torch.equal(again.weight_blocks, layer.weight_blocks)
