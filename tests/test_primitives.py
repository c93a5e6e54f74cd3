import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np

import lowbit.functional as F
from lowbit.formats import unpack_ternary_2bit


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40),
                  elements=st.floats(-1e3, 1e3, width=32)))
@settings(max_examples=80, deadline=None)
def test_absmax_rowwise_within_half_a_step(arr):
    x = torch.from_numpy(arr)
    codes, absmax = F.quantize_absmax(x, dim=-1)
    assert codes.dtype == torch.int8 and absmax.shape == (x.shape[0],)
    err = (F.dequantize_absmax(codes, absmax) - x).abs()
    step = (absmax / 127).unsqueeze(1)
    assert bool((err <= step / 2 + step * 1e-5 + 1e-30).all())
    # idempotent: quantizing the dequantized tensor gives the same codes
    codes2, _ = F.quantize_absmax(F.dequantize_absmax(codes, absmax), dim=-1)
    assert torch.equal(codes, codes2)


def test_absmax_per_column_and_tensor():
    x = torch.tensor([[1.0, -200.0], [0.5, 100.0]])
    codes, absmax = F.quantize_absmax(x, dim=0)  # one scale per column (weights by output row in W^T)
    assert absmax.tolist() == [1.0, 200.0]
    assert codes.tolist() == [[127, -127], [64, 64]]  # 63.5 rounds half to even
    codes, absmax = F.quantize_absmax(x, dim=None)
    assert absmax.item() == 200.0 and codes[0, 0].item() == 1


def test_affine_levels_and_error():
    x = torch.randn(16, 100) + 0.5
    for bits in range(2, 9):
        q = F.quantize_affine(x, bits, group_size=32)
        assert int(q.codes.max()) <= 2**bits - 1
        err = (F.dequantize_affine(q) - x).abs()
        step = q.scale.repeat_interleave(32, dim=1)[:, :100]
        assert bool((err <= step / 2 + 1e-5).all())


def test_affine_zero_is_exact():
    x = torch.tensor([[0.0, 1.0, 2.0, -3.0]])
    q = F.quantize_affine(x, 4)
    assert F.dequantize_affine(q)[0, 0] == 0.0


def test_ternary_absmean():
    w = torch.tensor([[0.3, -0.05, -2.0, 0.1], [0.0, 0.6, -0.2, 0.02]])
    packed, gamma = F.quantize_ternary(w)
    assert gamma.item() == pytest.approx(w.abs().mean().item())
    trits = unpack_ternary_2bit(packed, w.numel()).view_as(w)
    # round(w / gamma) clamped: gamma = 0.40875
    assert trits.tolist() == [[1, 0, -1, 0], [0, 1, 0, 0]]
    assert torch.allclose(F.dequantize_ternary(packed, gamma, w.shape), trits.float() * gamma)
    assert packed.numel() == 2  # 2 bits a weight


def test_activation_int8_is_per_token():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -50.0]])
    codes, absmax = F.quantize_activations_int8(x)
    assert absmax.tolist() == [2.0, 100.0]
    assert codes[0].tolist() == [64, -127, 32]
    assert torch.allclose(F.dequantize_activations_int8(codes, absmax), x, atol=100 / 127 / 2)


def test_bits_per_param_counts_every_constant():
    # QLoRA's figures: 32/64 = 0.5 bits of constants, 8/64 + 32/(64*256) = 0.127 with double quant.
    assert F.bits_per_param("nf4", blocksize=64) == 4.5
    assert F.bits_per_param("nf4", shape=(4096, 4096), blocksize=64, double_quant=True) == pytest.approx(4.127, abs=5e-4)
    assert F.bits_per_param("int8", shape=(1024, 1024)) == 8 + 32 / 1024
    assert F.bits_per_param("ternary", shape=(1000, 1000)) == pytest.approx(2.0, abs=1e-4)
    assert F.bits_per_param("ternary-base3", shape=(1000, 1000)) == pytest.approx(1.6, abs=1e-4)
    assert F.bits_per_param("bf16") == 16
    # a tensor that does not fill its last block pays for it
    assert F.bits_per_param("nf4", shape=(1, 65), blocksize=64) == (33 * 8 + 2 * 32) / 65
    with pytest.raises(ValueError, match="unknown format"):
        F.bits_per_param("nf5")


def test_bits_per_param_matches_stored_bytes():
    x = torch.randn(300, 130)
    q = F.quantize_4bit(x, "nf4", 64, double_quant=True)
    stored = q.codes.numel() * 8 + q.nested.codes.numel() * 8 + q.nested.absmax.numel() * 32 + 32
    assert F.bits_per_param("nf4", shape=(300, 130), blocksize=64, double_quant=True) == stored / x.numel()
