import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.fitting import LogLogFit, loglog_slope


def reference_ols(x, y):
    """Loop transcription of least squares on (log x, log y)."""
    u = [math.log(v) for v in x]
    v = [math.log(w) for w in y]
    ub, vb = sum(u) / len(u), sum(v) / len(v)
    sxy = sum((a - ub) * (b - vb) for a, b in zip(u, v))
    sxx = sum((a - ub) ** 2 for a in u)
    return sxy / sxx, vb - sxy / sxx * ub


def test_exact_power_law():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    fit = loglog_slope(x, 3.0 * x ** -1.5)
    assert isinstance(fit, LogLogFit) and fit.n == 5 and fit.level == 0.95
    assert fit.slope == pytest.approx(-1.5, abs=1e-12) and fit.intercept == pytest.approx(math.log(3.0), abs=1e-12)
    assert fit.interval[0] == pytest.approx(-1.5, abs=1e-9) and fit.interval[1] == pytest.approx(-1.5, abs=1e-9)
    assert fit.contains(-1.5) and not fit.contains(-1.4)
    np.testing.assert_allclose(fit.predict([32.0]), 3.0 * 32.0 ** -1.5)
    assert "slope -1.500" in str(fit)


def test_matches_loop_reference_and_polyfit():
    rng = np.random.default_rng(0)
    x = np.exp(rng.uniform(0, 4, 30))
    y = np.exp(rng.normal(0, 1, 30)) * x ** 0.7
    fit = loglog_slope(x, y, n_boot=0)
    s, b = reference_ols(x.tolist(), y.tolist())
    assert fit.slope == pytest.approx(s, rel=1e-12) and fit.intercept == pytest.approx(b, rel=1e-12)
    assert fit.slope == pytest.approx(np.polyfit(np.log(x), np.log(y), 1)[0], rel=1e-10)
    assert all(math.isnan(v) for v in fit.interval)


def test_seeds_broadcast_against_one_x():
    x = np.logspace(0, 2, 8)
    rng = np.random.default_rng(1)
    y = 5 * x ** -1.0 * np.exp(0.05 * rng.standard_normal((4, 8)))       # 4 seeds
    fit = loglog_slope(x, y)
    flat = loglog_slope(np.tile(x, 4), y.reshape(-1))
    assert fit.n == 32 and fit.slope == pytest.approx(flat.slope, rel=1e-12)
    assert fit.contains(-1.0)
    # read-only views (np.broadcast_to) are accepted
    assert loglog_slope(np.broadcast_to(x, (4, 8)), y).slope == pytest.approx(fit.slope, rel=1e-12)


def test_interval_coverage_is_roughly_nominal():
    """Over many noisy data sets, the 90 % interval holds the true slope most of the time."""
    rng = np.random.default_rng(2)
    x = np.logspace(0, 3, 25)
    hits = 0
    for k in range(120):
        y = 2 * x ** 0.5 * np.exp(0.2 * rng.standard_normal(25))
        hits += loglog_slope(x, y, level=0.9, n_boot=400, generator=k).contains(0.5)
    assert 0.75 * 120 <= hits <= 120


def test_generator_and_seed_reproducible():
    rng = np.random.default_rng(3)
    x = np.logspace(0, 1, 10)
    y = x * np.exp(0.3 * rng.standard_normal(10))
    a = loglog_slope(x, y, generator=7)
    b = loglog_slope(x, y, generator=torch.Generator().manual_seed(7))
    c = loglog_slope(x, y, generator=8)
    assert a == b and a.interval != c.interval
    assert loglog_slope(x, y) == loglog_slope(x, y)          # default seed: a fit repeats exactly


def test_torch_inputs():
    x = torch.logspace(0, 2, 6, dtype=torch.float32)
    fit = loglog_slope(x, 4 * x ** 2)
    assert fit.slope == pytest.approx(2.0, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(slope=st.floats(-3, 3), c=st.floats(0.01, 100), k=st.floats(0.5, 3), seed=st.integers(0, 1000))
def test_property_invariances(slope, c, k, seed):
    rng = np.random.default_rng(seed)
    x = np.exp(rng.uniform(-2, 2, 12))
    y = np.exp(rng.normal(0, 0.3, 12)) * x ** slope
    base = loglog_slope(x, y, n_boot=50)
    scaled = loglog_slope(x, c * y, n_boot=50)                  # a constant factor moves only the intercept
    assert scaled.slope == pytest.approx(base.slope, abs=1e-9)
    assert scaled.intercept == pytest.approx(base.intercept + math.log(c), abs=1e-9)
    assert loglog_slope(x, 1 / y, n_boot=0).slope == pytest.approx(-base.slope, abs=1e-9)
    assert loglog_slope(x ** k, y, n_boot=0).slope == pytest.approx(base.slope / k, rel=1e-9, abs=1e-9)
    lo, hi = base.interval
    assert lo <= hi


def test_bad_input():
    x = [1.0, 2.0, 4.0]
    for bad_y in ([1.0, 0.0, 2.0], [1.0, -1.0, 2.0], [1.0, math.nan, 2.0], [1.0, math.inf, 2.0]):
        with pytest.raises(ValueError, match="y must hold positive"):
            loglog_slope(x, bad_y)
    with pytest.raises(ValueError, match="x must hold positive"):
        loglog_slope([0.0, 1.0, 2.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at least 3 points"):
        loglog_slope([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="two distinct"):
        loglog_slope([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="same shape"):
        loglog_slope([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        loglog_slope(x, x, level=1.0)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="n_boot"):
            loglog_slope(x, x, n_boot=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs():
    x = torch.logspace(0, 2, 6, device="cuda")
    fit = loglog_slope(x, 3 * x ** -0.5)
    assert fit.slope == pytest.approx(-0.5, abs=1e-5)
