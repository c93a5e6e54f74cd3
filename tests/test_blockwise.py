import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit.functional as F
from lowbit import kernels
from lowbit.formats import codebook


def widest_gap(name: str) -> float:
    """Twice the largest rounding error on [-1, 1]: the widest gap between codes, or twice the distance
    from a range end (+-1) to the nearest code when the codebook does not reach it (the dynamic map stops at -0.993)."""
    c = codebook(name).sort().values
    inner = float((c[1:] - c[:-1]).max())
    return max(inner, 2 * float(c[0] + 1), 2 * float(1 - c[-1]))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 256, 2048, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_error_within_half_the_widest_gap(quant_type, blocksize, double_quant, rng):
    x = torch.randn(37, 301, generator=rng) * 3  # 11137 values: no multiple of any blocksize
    q = F.quantize_4bit(x, quant_type, blocksize, double_quant)
    y = F.dequantize_4bit(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    absmax = q.block_absmax()
    per_elem = absmax.repeat_interleave(blocksize)[: x.numel()].view_as(x)
    bound = widest_gap(quant_type) / 2 * per_elem
    slack = 0 if not double_quant else (per_elem - F.quantize_4bit(x, quant_type, blocksize).absmax.repeat_interleave(blocksize)[: x.numel()].view_as(x)).abs() + 1e-6
    # With double quant the scale itself is approximate: allow the scale error on top.
    assert bool(((y - x).abs() <= bound + slack + 1e-6).all())


def test_blockwise8_error_within_half_the_widest_gap(rng):
    x = torch.randn(1000, 77, generator=rng)
    q = F.quantize_blockwise(x, "dynamic", 256)
    y = F.dequantize_blockwise(q)
    per_elem = q.absmax.repeat_interleave(256)[: x.numel()].view_as(x)
    assert bool(((y - x).abs() <= (widest_gap("dynamic") / 2 + 1e-6) * per_elem).all())  # 1e-6: float rounding of code * absmax


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_idempotent(quant_type, rng):
    x = torch.randn(64 * 50 + 6, generator=rng)
    q = F.quantize_4bit(x, quant_type, 64)
    q2 = F.quantize_4bit(F.dequantize_4bit(q), quant_type, 64)
    assert torch.equal(q.absmax, q2.absmax)
    assert torch.equal(F.dequantize_4bit(q), F.dequantize_4bit(q2))
    if quant_type == "nf4":
        assert torch.equal(q.codes, q2.codes)
    else:  # FP4 has +0 and -0: a zero may come back under the other code, with the same value
        same = q.codes == q2.codes
        assert bool((same | ((q.codes ^ q2.codes) & 0x77 == 0)).all())


def test_blockwise8_idempotent(rng):
    x = torch.randn(4096 + 17, generator=rng)
    # The dynamic map reaches +1 but only -0.993: a block is a fixed point when its absmax is positive.
    x[::256] = 5.0
    q = F.quantize_blockwise(x)
    q2 = F.quantize_blockwise(F.dequantize_blockwise(q))
    assert torch.equal(q.codes, q2.codes)


def test_padding_never_truncates():
    x = torch.arange(1, 131, dtype=torch.float32)  # 130 values = 2 blocks of 64 + 2
    q = F.quantize_4bit(x, "nf4", 64)
    assert q.absmax.numel() == 3 and q.codes.numel() == 65
    assert float(q.absmax[-1]) == 130.0
    assert F.dequantize_4bit(q)[-1] == 130.0  # the tail's absmax element is exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_dtypes_and_layouts(dtype, contiguous, rng):
    base = torch.randn(128, 96, generator=rng).to(dtype)
    x = base if contiguous else base.t()
    q = F.quantize_4bit(x, "nf4", 64, double_quant=True)
    y = F.dequantize_4bit(q)
    assert y.dtype == dtype and y.shape == x.shape
    ref = F.dequantize_4bit(F.quantize_4bit(x.float().contiguous(), "nf4", 64, double_quant=True))
    assert torch.equal(y, ref.to(dtype))
    codes, absmax = F.quantize_absmax(x)
    assert torch.allclose(F.dequantize_absmax(codes, absmax).to(dtype).float(), x.float(), atol=float(absmax.max()) / 127)


def test_dequantize_into_out_buffer(rng):
    x = torch.randn(64, 64, generator=rng)
    q = F.quantize_4bit(x)
    out = torch.empty(64, 64)
    assert F.dequantize_4bit(q, out=out) is out
    assert torch.equal(out, F.dequantize_4bit(q))


def test_double_quant_follows_qlora(rng):
    x = torch.randn(256 * 64 * 3, generator=rng)
    q = F.quantize_4bit(x, "nf4", 64, double_quant=True)
    plain = F.quantize_4bit(x, "nf4", 64)
    nested = q.nested
    assert nested.codes.dtype == torch.uint8 and nested.codes.numel() == plain.absmax.numel()
    assert nested.absmax.numel() == 3 and nested.blocksize == 256
    assert torch.allclose(nested.offset, plain.absmax.mean())
    # 8-bit constants: every block scale within half a dynamic-map step of the true one.
    err = (q.block_absmax() - plain.absmax).abs()
    assert float(err.max()) <= widest_gap("dynamic") / 2 * float(nested.absmax.max()) + 1e-6
    assert torch.equal(q.codes, plain.codes)


def test_custom_codebook(rng):
    code = torch.linspace(-1, 1, 16)
    x = torch.randn(640, generator=rng)
    q = F.quantize_4bit(x, code, 64)
    y = F.dequantize_4bit(q)
    per_elem = q.absmax.repeat_interleave(64)
    assert bool(((y - x).abs() <= (2 / 15) / 2 * per_elem + 1e-6).all())
    q8 = F.quantize_blockwise(x, torch.linspace(-1, 1, 256), 128)
    assert float((F.dequantize_blockwise(q8) - x).abs().max()) <= (2 / 255) / 2 * float(x.abs().max()) + 1e-6


@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=300), st.sampled_from([2, 8, 64, 256]))
@settings(max_examples=80, deadline=None)
def test_fast_equals_reference_property(values, blocksize):
    x = torch.tensor(values, dtype=torch.float32)
    fast4, fast8 = F.quantize_4bit(x, "fp4", blocksize), F.quantize_blockwise(x, "dynamic", blocksize)
    with kernels.reference_only():
        ref4, ref8 = F.quantize_4bit(x, "fp4", blocksize), F.quantize_blockwise(x, "dynamic", blocksize)
        assert torch.equal(F.dequantize_4bit(fast4), F.dequantize_4bit(ref4))
    assert torch.equal(fast4.codes, ref4.codes) and torch.equal(fast4.absmax, ref4.absmax)
    assert torch.equal(fast8.codes, ref8.codes) and torch.equal(fast8.absmax, ref8.absmax)


@pytest.mark.parametrize("shape", [(1,), (3, 5), (4096 + 3,), (127, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_equals_reference_every_kernel(shape, dtype, rng):
    assert kernels.fast() is not None, "the C++ kernels should build on this machine"
    x = (torch.randn(shape, generator=rng) * 2).to(dtype)
    results = []
    for ctx in (kernels.reference_only, _nothing):
        with ctx():
            q4 = F.quantize_4bit(x, "nf4", 64, double_quant=True)
            q8 = F.quantize_blockwise(x, "dynamic", 256)
            c8, a8 = F.quantize_absmax(x.reshape(-1, shape[-1]))
            t, g = F.quantize_ternary(x)
            results.append([q4.codes, q4.nested.codes, F.dequantize_4bit(q4, torch.bfloat16), F.dequantize_4bit(q4, torch.float32),
                            q8.codes, F.dequantize_blockwise(q8, torch.float16), c8, a8, t, g])
    for ref, fast in zip(*results):
        assert torch.equal(ref, fast)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_real_weights_roundtrip(real_weights):
    for w in real_weights.values():
        y = F.dequantize_4bit(F.quantize_4bit(w, "nf4", 64, double_quant=True))
        rel = float((y - w).norm() / w.norm())
        assert 0 < rel < 0.12  # NF4 on real weights: ~9% relative error, far from failure
        codes, absmax = F.quantize_absmax(w)
        assert float((F.dequantize_absmax(codes, absmax) - w).norm() / w.norm()) < 0.015
