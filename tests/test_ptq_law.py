"""The PTQ degradation law's fit recovers constants planted in synthetic points, its intervals cover them, and it
refuses points that cannot identify them."""
import math

import pytest
import torch

from lowbit.analysis.ptq_law import Point, fit_ptq_law

TRUE = dict(lnC=-2.0, a=0.5, b=0.35, inv_g=1 / 0.6)  # planted, of the paper's kind of size


def synthetic(noise: float, sizes=(2e5, 5e5, 1e6), seed: int = 0) -> list[Point]:
    g = torch.Generator().manual_seed(seed)
    points = []
    for n in sizes:
        for d in (5e5, 1e6, 2e6, 4e6, 8e6, 16e6):
            for bits in (3, 4, 8):
                ln_delta = (TRUE["lnC"] + TRUE["a"] * math.log(d) - TRUE["b"] * math.log(n) - bits * TRUE["inv_g"]
                            + noise * float(torch.randn(1, generator=g)))
                points.append(Point(d, n, bits, math.exp(ln_delta)))
    return points


def test_recovers_planted_constants_exactly_without_noise():
    f = fit_ptq_law(synthetic(0.0), resamples=50)
    for name, value in TRUE.items():
        assert f[name] == pytest.approx(value, abs=1e-6), name
    assert f["g"] == pytest.approx(0.6) and f["rms_residual"] < 1e-9


def test_intervals_cover_the_planted_constants_under_noise():
    f = fit_ptq_law(synthetic(0.3), resamples=400)
    for name, value in TRUE.items():
        lo, hi = f["ci95"][name]
        assert lo < value < hi, (name, lo, value, hi)
        if name != "lnC":  # the intercept sits far outside the data (ln D ~ 15), so its interval is wide
            assert hi - lo < 1.0, name  # informative, not everything
    assert 0.2 < f["rms_residual"] < 0.4 and len(f["residuals"]) == f["points"] == 54


def test_points_with_no_loss_are_left_out_and_one_size_drops_b():
    points = synthetic(0.0, sizes=(5e5,)) + [Point(1e6, 5e5, 8, -0.001), Point(2e6, 5e5, 8, 0.0),
                                             Point(4e6, 5e5, 4, float("inf")), Point(4e6, 5e5, 3, float("nan"))]
    f = fit_ptq_law(points, resamples=50)
    assert f["excluded"] == 4 and "b" not in f and f["a"] == pytest.approx(TRUE["a"], abs=1e-6)


def test_too_few_or_degenerate_points_are_refused():
    with pytest.raises(ValueError, match="needs at least"):
        fit_ptq_law(synthetic(0.0)[:4])
    same_tokens = [p for p in synthetic(0.0) if p.tokens == 1e6]
    with pytest.raises(ValueError, match="do not vary enough"):
        fit_ptq_law(same_tokens)
    with pytest.raises(ValueError, match="bootstrap resamples"):
        fit_ptq_law(synthetic(0.0), resamples=0)
