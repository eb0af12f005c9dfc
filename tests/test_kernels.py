import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.kernels import (conditional_cs_divergence, cs_divergence, cs_qmi, gaussian_gram, kde,
                              median_bandwidth, sq_distances)

D = torch.float64


def k(u, v, s):
    """Loop reference of the Gaussian kernel on two points (lists of floats)."""
    return math.exp(-sum((a - b) ** 2 for a, b in zip(u, v)) / (2 * s * s))


def rows(x):
    x = x.unsqueeze(1) if x.dim() == 1 else x
    return x.tolist()


def ref_gram(x, y, s):
    return torch.tensor([[k(a, b, s) for b in rows(y)] for a in rows(x)], dtype=D)


def ref_cs_divergence(x, y, s):
    X, Y = rows(x), rows(y)
    pp = sum(k(a, b, s) for a in X for b in X) / len(X) ** 2
    qq = sum(k(a, b, s) for a in Y for b in Y) / len(Y) ** 2
    pq = sum(k(a, b, s) for a in X for b in Y) / (len(X) * len(Y))
    return math.log(pp) + math.log(qq) - 2 * math.log(pq)


def ref_cs_qmi(x, t, sx, st_):
    X, T = rows(x), rows(t)
    n = len(X)
    kx = [[k(X[i], X[j], sx) for j in range(n)] for i in range(n)]
    kt = [[k(T[i], T[j], st_) for j in range(n)] for i in range(n)]
    joint = sum(kx[i][j] * kt[i][j] for i in range(n) for j in range(n)) / n ** 2
    marg = sum(map(sum, kx)) * sum(map(sum, kt)) / n ** 4
    cross = sum(sum(kx[i][j] for j in range(n)) * sum(kt[i][j] for j in range(n)) for i in range(n)) / n ** 3
    return math.log(joint) + math.log(marg) - 2 * math.log(cross)


def ref_conditional(x, y, yh, sx, sy, normalizer):
    X, Y, H = rows(x), rows(y), rows(yh)
    n = len(X)
    tot = [0.0, 0.0, 0.0]
    for j in range(n):
        kj = [k(X[j], X[i], sx) for i in range(n)]
        w = sum(kj) ** 2 if normalizer == "kde" else sum(v * v for v in kj)
        tot[0] += sum(kj[i] * k(Y[j], Y[i], sy) for i in range(n)) / w
        tot[1] += sum(kj[i] * k(H[j], H[i], sy) for i in range(n)) / w
        tot[2] += sum(kj[i] * k(H[j], Y[i], sy) for i in range(n)) / w
    return math.log(tot[0]) + math.log(tot[1]) - 2 * math.log(tot[2])


def data(seed, n=9, d=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D),
            torch.randn(n, generator=g, dtype=D), torch.randn(n + 2, d, generator=g, dtype=D))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_gram_and_distances_match_loops(sigma):
    x, y, _, z = data(0)
    torch.testing.assert_close(gaussian_gram(x, z, sigma), ref_gram(x, z, sigma), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gaussian_gram(y, None, sigma), ref_gram(y, y, sigma), rtol=1e-12, atol=1e-14)
    d = sq_distances(x)
    assert torch.equal(d.diagonal(), torch.zeros(len(x), dtype=D)) and bool((d >= 0).all())
    torch.testing.assert_close(d, torch.cdist(x, x) ** 2, rtol=1e-10, atol=1e-12)


def test_one_dimensional_input_is_n_points_not_one_vector():
    y = torch.tensor([0.0, 1.0, 3.0], dtype=D)
    g = gaussian_gram(y)
    assert g.shape == (3, 3)
    torch.testing.assert_close(g, gaussian_gram(y.unsqueeze(1)))
    assert g[0, 1] == pytest.approx(math.exp(-0.5)) and g[0, 2] == pytest.approx(math.exp(-4.5))


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_cs_estimators_match_loops(sigma):
    x, y, yh, z = data(1)
    assert cs_divergence(x, z, sigma).item() == pytest.approx(ref_cs_divergence(x, z, sigma), rel=1e-10)
    assert cs_qmi(x, y, sigma, 0.8).item() == pytest.approx(ref_cs_qmi(x, y, sigma, 0.8), rel=1e-10)
    for norm in ("kde", "sum_sq"):
        got = conditional_cs_divergence(x, y, yh, sigma, 0.9, normalizer=norm).item()
        assert got == pytest.approx(ref_conditional(x, y, yh, sigma, 0.9, norm), rel=1e-10)


def test_normalized_qmi_and_special_cases():
    x, y, yh, _ = data(2, n=12)
    # normalized form divides by the geometric mean of the self-informations
    raw, self_x, self_t = cs_qmi(x, y, 1.0), cs_qmi(x, x, 1.0), cs_qmi(y, y, 1.0)
    torch.testing.assert_close(cs_qmi(x, y, 1.0, normalized=True), raw / (self_x * self_t).sqrt())
    torch.testing.assert_close(cs_qmi(x, x, 1.0, normalized=True), torch.tensor(1.0, dtype=D))
    # a constant representation carries no information
    assert abs(cs_qmi(x, torch.zeros(12, 4, dtype=D), 1.0).item()) < 1e-12
    # identical samples: zero divergence
    assert abs(cs_divergence(x, x.clone()).item()) < 1e-12
    assert abs(conditional_cs_divergence(x, y, y.clone()).item()) < 1e-12


def test_conditional_limits():
    x, y, yh, _ = data(3, n=10, d=2)
    # narrow input kernel: K -> I, the estimator becomes -2 log mean correntropy
    corr = -2 * torch.log(torch.exp(-(y - yh) ** 2 / 2).mean())
    for norm in ("kde", "sum_sq"):
        torch.testing.assert_close(conditional_cs_divergence(x, y, yh, 1e-3, 1.0, normalizer=norm), corr)
    # wide input kernel: K -> 1, the estimator becomes the CS divergence of the marginals
    torch.testing.assert_close(conditional_cs_divergence(x, y, yh, 1e4, 1.0), cs_divergence(y, yh, 1.0),
                               rtol=1e-6, atol=1e-8)


def test_qmi_independent_much_smaller_than_dependent():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 2, generator=g, dtype=D)
    t_ind = torch.randn(500, 2, generator=g, dtype=D)
    t_dep = x + 0.1 * torch.randn(500, 2, generator=g, dtype=D)
    i_ind, i_dep = cs_qmi(x, t_ind, 1.0).item(), cs_qmi(x, t_dep, 1.0).item()
    assert 0 <= i_ind < 0.1 * i_dep


def test_kde_integrates_to_one_and_median_bandwidth():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(50, generator=g, dtype=D)
    grid = torch.linspace(-8, 8, 4001, dtype=D)
    p = kde(grid, s, 0.4)
    assert torch.trapezoid(p, grid).item() == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(7, 3, generator=g, dtype=D)
    ref = sorted(math.dist(a, b) for i, a in enumerate(x.tolist()) for b in x.tolist()[i + 1:])
    assert median_bandwidth(x).item() == pytest.approx(ref[len(ref) // 2], rel=1e-10)  # 21 pairs: odd
    assert median_bandwidth(torch.zeros(4, 2)).item() == pytest.approx(1e-2)


finite = st.floats(-5, 5, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 20), sigma=st.floats(0.1, 5.0),
       shift=finite, perm_seed=st.integers(0, 1000))
def test_property_invariances_and_signs(seed, n, sigma, shift, perm_seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=D)
    z = torch.randn(n + 1, 2, generator=g, dtype=D) + 0.5
    t = torch.randn(n, 3, generator=g, dtype=D)
    y, yh = torch.randn(n, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    # non-negativity of the two PSD-based estimators
    assert cs_divergence(x, z, sigma).item() >= -1e-10
    assert cs_qmi(x, t, sigma).item() >= -1e-10
    # symmetry and translation invariance
    torch.testing.assert_close(cs_divergence(x, z, sigma), cs_divergence(z, x, sigma))
    torch.testing.assert_close(cs_divergence(x + shift, z + shift, sigma), cs_divergence(x, z, sigma),
                               rtol=1e-7, atol=1e-9)
    # every estimator is invariant to reordering the (paired) samples
    torch.testing.assert_close(cs_qmi(x[perm], t[perm], sigma), cs_qmi(x, t, sigma))
    torch.testing.assert_close(conditional_cs_divergence(x[perm], y[perm], yh[perm], sigma),
                               conditional_cs_divergence(x, y, yh, sigma))


def test_gradcheck():
    x, y, yh, _ = data(6, n=6, d=2)
    t = torch.randn(6, 3, dtype=D, generator=torch.Generator().manual_seed(7))
    for f, args in [(lambda a: conditional_cs_divergence(x, y, a, 1.0), (yh.clone().requires_grad_(),)),
                    (lambda a: cs_qmi(x, a, 1.0, normalized=True), (t.clone().requires_grad_(),)),
                    (lambda a: cs_divergence(a, x, 1.3), (t[:, :2].clone().requires_grad_(),))]:
        assert torch.autograd.gradcheck(f, args)


def test_float32_stays_finite_on_far_apart_points():
    x = torch.randn(64, 5) * 10
    y, yh = torch.randn(64) * 50, torch.randn(64) * 50
    assert torch.isfinite(cs_qmi(x, x * 2, 1.0, normalized=True))
    assert torch.isfinite(conditional_cs_divergence(x, y, yh, 1.0, 10.0))


def test_bad_input_names_the_argument():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_gram(x, sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_gram(x, sigma=math.nan)
    with pytest.raises(ValueError, match="floating"):
        gaussian_gram(torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must have shape"):
        gaussian_gram(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="same dimension"):
        sq_distances(x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="paired"):
        cs_qmi(x, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="paired"):
        conditional_cs_divergence(x, torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="normalizer"):
        conditional_cs_divergence(x, torch.zeros(4), torch.zeros(4), normalizer="median")
    with pytest.raises(ValueError, match="at least two"):
        median_bandwidth(torch.zeros(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, y, yh, z = data(8, n=32)
    t = torch.randn(32, 4, dtype=D)
    for f in (lambda *a: cs_qmi(a[0], a[3], 1.0, normalized=True), lambda *a: conditional_cs_divergence(*a[:3]),
              lambda *a: cs_divergence(a[0], a[4])):
        cpu = f(x, y, yh, t, z)
        gpu = f(x.cuda(), y.cuda(), yh.cuda(), t.cuda(), z.cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)
