import pytest
import torch

import lowbit.functional as F
from lowbit import kernels


def _all_quantizers():
    return {
        "nf4": lambda x: F.quantize_4bit(x, "nf4", 64),
        "fp4-dq": lambda x: F.quantize_4bit(x, "fp4", 64, double_quant=True),
        "blockwise8": lambda x: F.quantize_blockwise(x, "dynamic", 256),
        "absmax-row": lambda x: F.quantize_absmax(x, dim=-1),
        "absmax-tensor": lambda x: F.quantize_absmax(x, dim=None),
        "ternary": F.quantize_ternary,
        "affine": lambda x: F.quantize_affine(x.reshape(4, -1), 4, 16),
    }


@pytest.mark.parametrize("name", list(_all_quantizers()))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("reference", [False, True])
def test_nan_and_inf_raise(name, bad, reference):
    x = torch.randn(8, 64)
    x[3, 17] = bad
    ctx = kernels.reference_only() if reference else _null()
    with ctx, pytest.raises(ValueError, match="NaN or Inf"):
        _all_quantizers()[name](x)


@pytest.mark.parametrize("name", list(_all_quantizers()))
def test_empty_raises(name):
    with pytest.raises(ValueError, match="empty"):
        _all_quantizers()[name](torch.empty(0))


@pytest.mark.parametrize("name", list(_all_quantizers()))
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.complex64, torch.float64, torch.bool])
def test_wrong_dtype_raises(name, dtype):
    x = torch.ones(8, 64).to(dtype)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        _all_quantizers()[name](x)


@pytest.mark.parametrize("blocksize", [0, -64, 1.5, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        F.quantize_4bit(torch.randn(64), "nf4", blocksize)
    with pytest.raises(ValueError, match="blocksize"):
        F.quantize_blockwise(torch.randn(64), "dynamic", blocksize)


def test_odd_4bit_blocksize_and_unknown_type():
    with pytest.raises(ValueError, match="even"):
        F.quantize_4bit(torch.randn(64), "nf4", 33)
    with pytest.raises(ValueError, match="quant_type"):
        F.quantize_4bit(torch.randn(64), "nf5", 64)
    with pytest.raises(ValueError, match="16 values"):
        F.quantize_4bit(torch.randn(64), torch.linspace(-1, 1, 8), 64)
    with pytest.raises(ValueError, match="sorted"):
        F.quantize_blockwise(torch.randn(64), torch.tensor([0.5, -1.0, 1.0]), 64)


def test_mismatched_codes_and_scales_on_dequantize():
    q = F.quantize_4bit(torch.randn(10, 64), "nf4", 64)
    with pytest.raises(ValueError, match="block scales"):
        F.dequantize_4bit(F.Blockwise(q.codes, q.absmax[:-1], q.code, 64, q.shape, q.dtype, 4))
    with pytest.raises(ValueError, match="codes hold"):
        F.dequantize_4bit(F.Blockwise(q.codes[:-1], q.absmax, q.code, 64, q.shape, q.dtype, 4))
    with pytest.raises(ValueError, match="codes hold"):
        F.dequantize_4bit(F.Blockwise(q.codes, q.absmax, q.code, 64, torch.Size([11, 64]), q.dtype, 4))
    q8 = F.quantize_blockwise(torch.randn(1000))
    with pytest.raises(ValueError, match="block scales"):
        F.dequantize_blockwise(F.Blockwise(q8.codes, q8.absmax[:2], q8.code, 256, q8.shape, q8.dtype, 8))
    codes, absmax = F.quantize_absmax(torch.randn(4, 8))
    with pytest.raises(ValueError, match="absmax has shape"):
        F.dequantize_absmax(codes, absmax[:3])
    with pytest.raises(TypeError, match="int8"):
        F.dequantize_absmax(codes.float(), absmax)
    with pytest.raises(ValueError, match="out must be"):
        F.dequantize_4bit(q, out=torch.empty(10, 63))


def test_bad_bits_for_affine():
    for bits in (1, 9, 4.0):
        with pytest.raises(ValueError, match="bits"):
            F.quantize_affine(torch.randn(4, 8), bits)


def test_zero_tensor_is_fine():
    x = torch.zeros(3, 64)
    assert torch.equal(F.dequantize_4bit(F.quantize_4bit(x)), x)
    assert torch.equal(F.dequantize_blockwise(F.quantize_blockwise(x)), x)
    codes, absmax = F.quantize_absmax(x)
    assert torch.equal(F.dequantize_absmax(codes, absmax), x)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
