import bitsandbytes.functional as bnbf
import pytest
import torch

from lowbit.formats import FP4_VALUES, NF4_VALUES, codebook, int_grid


def test_nf4_matches_bitsandbytes_table_exactly():
    assert torch.equal(codebook("nf4"), bnbf.get_4bit_type("nf4", device="cpu"))


def test_nf4_is_the_normal_quantile_construction_of_qlora():
    # QLoRA: 8 positive quantiles of N(0,1) from offset .9677 to .5 and 7 negative ones, plus 0, scaled to [-1, 1].
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    values = values / values.abs().max()
    assert torch.allclose(values.float(), torch.tensor(NF4_VALUES), atol=2e-6)
    assert NF4_VALUES[7] == 0.0 and NF4_VALUES[0] == -1.0 and NF4_VALUES[-1] == 1.0


def test_fp4_values_are_sign_and_magnitude_in_code_order():
    assert torch.equal(codebook("fp4"), bnbf.get_4bit_type("fp4", device="cpu"))
    for code, value in enumerate(FP4_VALUES):
        # The high bit is the sign; the low three bits pick the same magnitude for both signs.
        assert abs(value) == abs(FP4_VALUES[code & 7])
        assert value <= 0 if code & 8 else value >= 0
    magnitudes = sorted(abs(v) * 12 for v in FP4_VALUES[:8])
    assert magnitudes == [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]  # e2m1 values, subnormal 0.0625


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    ours = codebook("dynamic" if signed else "dynamic_unsigned")
    assert ours.shape == (256,)
    assert torch.equal(ours, bnbf.create_dynamic_map(signed=signed))
    assert bool((ours[1:] >= ours[:-1]).all())
    assert float(ours.max()) == 1.0 and 0.0 in ours.tolist()


def test_dynamic_map_spans_seven_decades():
    c = codebook("dynamic")
    positive = c[c > 0]
    assert float(positive.min()) == pytest.approx(0.55e-6, rel=1e-3)  # 10^-6 times the first fraction centre
    assert (c < 0).sum() == 127 and (c > 0).sum() == 128


def test_int_grids():
    assert int_grid(8).tolist() == list(range(-127, 128))
    assert int_grid(3, signed=False).tolist() == list(range(8))
    with pytest.raises(ValueError):
        int_grid(9)


def test_codebook_is_a_copy():
    c = codebook("nf4")
    c[0] = 5.0
    assert codebook("nf4")[0] == -1.0
