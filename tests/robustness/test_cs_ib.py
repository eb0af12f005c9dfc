import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.robustness.cs_ib import IBRegressor, cs_ib_loss, cs_ib_terms, fgsm, fit_regressor, vib_loss

D = torch.float64


def k(u, v, s):
    return math.exp(-sum((a - b) ** 2 for a, b in zip(u, v)) / (2 * s * s))


def rows(x):
    return (x.unsqueeze(1) if x.dim() == 1 else x).tolist()


def ref_cs_ib(x, y, yh, t, beta, s):
    """Loop transcription of the CS-IB objective: conditional CS divergence (Parzen weights
    (sum_i K_ji)^2) plus beta times the normalised CS-QMI, all kernels of width s."""
    X, Y, H, T = rows(x), rows(y), rows(yh), rows(t)
    n = len(X)
    a = b = c = 0.0
    for j in range(n):
        kj = [k(X[j], X[i], s) for i in range(n)]
        w = sum(kj) ** 2
        a += sum(kj[i] * k(Y[j], Y[i], s) for i in range(n)) / w
        b += sum(kj[i] * k(H[j], H[i], s) for i in range(n)) / w
        c += sum(kj[i] * k(H[j], Y[i], s) for i in range(n)) / w
    pred = math.log(a) + math.log(b) - 2 * math.log(c)

    def qmi(P, Q):
        kp = [[k(P[i], P[j], s) for j in range(n)] for i in range(n)]
        kq = [[k(Q[i], Q[j], s) for j in range(n)] for i in range(n)]
        joint = sum(kp[i][j] * kq[i][j] for i in range(n) for j in range(n)) / n ** 2
        marg = sum(map(sum, kp)) * sum(map(sum, kq)) / n ** 4
        cross = sum(sum(kp[i]) * sum(kq[i]) for i in range(n)) / n ** 3
        return math.log(joint) + math.log(marg) - 2 * math.log(cross)

    comp = qmi(X, T) / math.sqrt(qmi(X, X) * qmi(T, T))
    return pred + beta * comp, pred, comp


def batch(seed, n=10, d=3, kdim=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D),
            torch.randn(n, generator=g, dtype=D), torch.randn(n, kdim, generator=g, dtype=D))


@pytest.mark.parametrize("beta,sigma", [(0.0, 1.0), (1e-2, 1.0), (0.5, 2.0)])
def test_objective_matches_loop_reference(beta, sigma):
    x, y, yh, t = batch(0)
    want, pred, comp = ref_cs_ib(x, y, yh, t, beta, sigma)
    got = cs_ib_loss(x, y, yh, t, beta=beta, sigma_x=sigma)
    assert got.item() == pytest.approx(want, rel=1e-10)
    p, c = cs_ib_terms(x, y, yh, t, sigma_x=sigma)
    assert p.item() == pytest.approx(pred, rel=1e-10) and c.item() == pytest.approx(comp, rel=1e-10)


def test_special_cases():
    x, y, yh, t = batch(1)
    # beta = 0 is the prediction term alone; a perfect prediction makes it 0
    torch.testing.assert_close(cs_ib_loss(x, y, yh, t, beta=0.0), cs_ib_terms(x, y, yh, t)[0])
    assert abs(cs_ib_loss(x, y, y.clone(), t, beta=0.0).item()) < 1e-12
    # narrow input kernel: the prediction term is -2 log of the mean correntropy (a Welsch loss)
    pred, _ = cs_ib_terms(x, y, yh, t, sigma_x=1e-3, sigma_y=1.0)
    torch.testing.assert_close(pred, -2 * torch.log(torch.exp(-(y - yh) ** 2 / 2).mean()))
    # the representation t = x itself carries all the information: normalised I_CS(x; x) = 1
    assert cs_ib_terms(x, y, yh, x)[1].item() == pytest.approx(1.0, rel=1e-12)


def test_correntropy_gradient_downweights_outliers():
    """The step that makes CS-IB robust: in the narrow-kernel limit the gradient on a residual r
    is proportional to r exp(-r^2 / 2 sigma^2), so a huge residual pulls (almost) nothing."""
    x = torch.randn(5, 2, dtype=D) * 100          # far-apart inputs: K = I
    y = torch.zeros(5, dtype=D)
    yh = torch.tensor([0.1, -0.2, 0.3, 0.5, 8.0], dtype=D, requires_grad=True)
    cs_ib_loss(x, y, yh, x, beta=0.0).backward()
    r = yh.detach()
    expected = r * torch.exp(-r ** 2 / 2)
    expected = 2 * expected / torch.exp(-r ** 2 / 2).sum()
    torch.testing.assert_close(yh.grad, expected)
    assert abs(yh.grad[-1]) < 1e-10 < abs(yh.grad[0])
    mse = torch.nn.functional.mse_loss(yh, y)
    (g,) = torch.autograd.grad(mse, yh)
    assert g.abs().argmax() == 4                   # MSE: the outlier dominates


def test_vib_loss_matches_closed_form():
    g = torch.Generator().manual_seed(2)
    y, yh = torch.randn(6, generator=g, dtype=D), torch.randn(6, generator=g, dtype=D)
    mu, logvar = torch.randn(6, 3, generator=g, dtype=D), torch.randn(6, 3, generator=g, dtype=D)
    kl = 0.0
    for i in range(6):
        for j in range(3):
            v = math.exp(logvar[i, j].item())
            kl += 0.5 * (mu[i, j].item() ** 2 + v - math.log(v) - 1)
    want = sum((a - b) ** 2 for a, b in zip(y.tolist(), yh.tolist())) / 6 + 0.1 * kl / 6
    assert vib_loss(y, yh, mu, logvar, beta=0.1).item() == pytest.approx(want, rel=1e-12)
    # beta = 0 is plain MSE; the KL is zero at the prior
    torch.testing.assert_close(vib_loss(y, yh, mu, logvar, beta=0.0), torch.nn.functional.mse_loss(yh, y))
    z = torch.zeros(6, 3, dtype=D)
    torch.testing.assert_close(vib_loss(y, yh, z, z, beta=5.0), torch.nn.functional.mse_loss(yh, y))


def test_fgsm_on_a_linear_model():
    w = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=D)
    x = torch.randn(8, 4, dtype=D, generator=torch.Generator().manual_seed(3))
    y = torch.randn(8, dtype=D, generator=torch.Generator().manual_seed(4))
    xa = fgsm(lambda z: z @ w, x, y, 0.1)
    err_sign = torch.sign(x @ w - y).unsqueeze(1)
    torch.testing.assert_close(xa, x + 0.1 * err_sign * torch.sign(w))
    assert bool(((xa @ w - y).abs() >= (x @ w - y).abs()).all())   # the attack never helps
    torch.testing.assert_close(fgsm(lambda z: z @ w, x, y, 0.0), x)


def test_regressor_shapes_and_modes():
    torch.manual_seed(0)
    x = torch.randn(16, 5)
    m = IBRegressor(5, (8, 8), 3)
    out = m(x)
    assert out.t.shape == (16, 3) and out.y_hat.shape == (16,) and torch.equal(out.t, out.mu)
    v = IBRegressor(5, (8,), 3, stochastic=True)
    v.train()
    assert not torch.equal(v(x).t, v(x).mu)
    v.eval()
    assert torch.equal(v(x).t, v(x).mu)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 16), beta=st.floats(0.0, 2.0), perm_seed=st.integers(0, 99))
def test_property_permutation_invariant_and_monotone_in_beta(seed, n, beta, perm_seed):
    x, y, yh, t = batch(seed, n=n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    a = cs_ib_loss(x, y, yh, t, beta=beta)
    torch.testing.assert_close(cs_ib_loss(x[perm], y[perm], yh[perm], t[perm], beta=beta), a)
    # the compression term is >= 0, so the objective never decreases in beta
    assert cs_ib_loss(x, y, yh, t, beta=beta + 0.5).item() >= a.item() - 1e-12
    assert torch.isfinite(a)


def test_gradcheck():
    x, y, yh, t = batch(5, n=6)
    yh.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: cs_ib_loss(x, y, a, b, beta=0.3), (yh, t))


def test_bad_input_names_the_argument():
    x, y, yh, t = batch(6)
    with pytest.raises(ValueError, match="beta"):
        cs_ib_loss(x, y, yh, t, beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        vib_loss(y, yh, t, t, beta=math.nan)
    with pytest.raises(ValueError, match="paired"):
        cs_ib_loss(x, y[:5], yh, t)
    with pytest.raises(ValueError, match="y and y_hat"):
        vib_loss(y, yh[:3], t, t)
    with pytest.raises(ValueError, match="eps"):
        fgsm(lambda z: z.sum(1), x, y, -0.1)
    with pytest.raises(ValueError, match="widths"):
        IBRegressor(0)
    with pytest.raises(ValueError, match="batch_size"):
        fit_regressor(IBRegressor(3, (4,), 2), lambda o, a, b: o.y_hat.sum(), x.float(), y.float(), epochs=1,
                      batch_size=1)
    with pytest.raises(ValueError, match="epochs"):
        fit_regressor(IBRegressor(3, (4,), 2), lambda o, a, b: o.y_hat.sum(), x.float(), y.float(), epochs=0)


def test_tiny_training_learns_and_resists_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 2, generator=g)
    f = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1]
    y = f.clone()
    y[:12] += 30.0                                                  # ~10 % gross outliers
    torch.manual_seed(0)
    m = IBRegressor(2, (32,), 8)
    before = (m(x).y_hat - f).pow(2).mean().sqrt().item()
    fit_regressor(m, lambda o, a, b: cs_ib_loss(a, b, o.y_hat, o.t, beta=1e-2), x, y, epochs=60, batch_size=64,
                  lr=1e-2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    m_mse = IBRegressor(2, (32,), 8)
    fit_regressor(m_mse, lambda o, a, b: torch.nn.functional.mse_loss(o.y_hat, b), x, y, epochs=60, batch_size=64,
                  lr=1e-2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        after = (m(x).y_hat - f).pow(2).mean().sqrt().item()
        after_mse = (m_mse(x).y_hat - f).pow(2).mean().sqrt().item()
    assert after < 0.5 < before and after_mse > 2.0     # MSE chases the outliers (their mean shift is 2.8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_trains():
    x, y, yh, t = batch(7, n=64)
    cpu = cs_ib_loss(x, y, yh, t, beta=1e-2)
    gpu = cs_ib_loss(x.cuda(), y.cuda(), yh.cuda(), t.cuda(), beta=1e-2)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)
    m = IBRegressor(3, (16,), 4).cuda()
    xs, ys = x.float().cuda(), y.float().cuda()
    losses = fit_regressor(m, lambda o, a, b: cs_ib_loss(a, b, o.y_hat, o.t), xs, ys, epochs=3, batch_size=32,
                           generator=torch.Generator().manual_seed(0))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
