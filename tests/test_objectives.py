import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.objectives import Quadratic, Rosenbrock, log_spectrum, quadratic, random_rotation, rosenbrock


def test_log_spectrum():
    lam = log_spectrum(5, 1e4, largest=2.0)
    torch.testing.assert_close(lam, torch.tensor([2.0, 0.2, 0.02, 0.002, 0.0002], dtype=torch.float64))
    assert log_spectrum(1, 10.0).tolist() == [1.0]
    assert torch.all(log_spectrum(7, 1.0) == 1.0)


def test_rotation_is_orthogonal():
    q = random_rotation(20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(20, dtype=torch.float64))


def test_quadratic_matches_loop_and_gradient():
    gen = torch.Generator().manual_seed(1)
    obj = Quadratic(log_spectrum(6, 100.0), generator=gen, dtype=torch.float64)
    a, xs = obj.hessian, obj.minimizer
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    e = (x - xs).tolist()
    loop = 0.5 * sum(e[i] * a[i, j].item() * e[j] for i in range(6) for j in range(6))
    assert math.isclose(obj(x).item(), loop, rel_tol=1e-12)
    torch.testing.assert_close(torch.linalg.eigvalsh(a), log_spectrum(6, 100.0).flip(0))
    xp = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(obj(xp), xp)
    torch.testing.assert_close(g, a @ (x - xs))
    assert obj(xs).item() == 0.0 and abs(obj.condition - 100.0) < 1e-9
    assert obj(torch.randn(3, 4, 6, dtype=torch.float64)).shape == (3, 4)     # vectorized
    assert torch.autograd.gradcheck(lambda y: quadratic(y, a, xs), (xp.detach().clone().requires_grad_(),))


def test_quadratic_unrotated_is_diagonal():
    obj = Quadratic(torch.tensor([3.0, 1.0]), rotate=False, minimizer=torch.zeros(2), x0=torch.ones(2))
    torch.testing.assert_close(obj.hessian, torch.diag(torch.tensor([3.0, 1.0])))
    assert obj.gap().item() == pytest.approx(2.0)


def test_rosenbrock_values_and_minimum():
    assert rosenbrock(torch.tensor([1.0, 1.0])).item() == 0.0
    assert rosenbrock(torch.tensor([-1.2, 1.0])).item() == pytest.approx(24.2)
    x = torch.tensor([0.3, -0.7, 1.1, 0.2], dtype=torch.float64)
    loop = sum(100 * (x[i + 1] - x[i] ** 2) ** 2 + (1 - x[i]) ** 2 for i in range(3))
    assert rosenbrock(x).item() == pytest.approx(loop.item(), rel=1e-12)
    assert Rosenbrock(2, a=2.0)(torch.tensor([2.0, 4.0])).item() == 0.0
    r = Rosenbrock(5)
    assert r(r.minimizer).item() == 0.0 and r.x.shape == (5,)
    assert torch.autograd.gradcheck(rosenbrock, (x.clone().requires_grad_(),))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(2, 8))
def test_property_nonnegative_zero_only_at_minimum(seed, d):
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(16, d, generator=gen, dtype=torch.float64)
    assert bool((rosenbrock(x) >= 0).all())
    obj = Quadratic(log_spectrum(d, 10.0), generator=gen, dtype=torch.float64)
    assert bool((obj(x) >= 0).all()) and obj(obj.minimizer).item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_descent_converges_on_both():
    obj = Quadratic(log_spectrum(10, 10.0), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(obj.parameters(), lr=1.0)
    start = obj.gap()
    for _ in range(200):
        opt.zero_grad()
        obj().backward()
        opt.step()
    assert obj.gap() < 1e-6 * start
    r = Rosenbrock(2)
    opt = torch.optim.Adam(r.parameters(), lr=0.02)
    for _ in range(2000):
        opt.zero_grad()
        r().backward()
        opt.step()
    assert r.gap() < 1e-3


def test_bad_input():
    with pytest.raises(ValueError, match="dim"):
        log_spectrum(0, 10.0)
    with pytest.raises(ValueError, match="condition"):
        log_spectrum(3, 0.5)
    with pytest.raises(ValueError, match="x must"):
        quadratic(torch.zeros(3), torch.eye(4))
    with pytest.raises(ValueError, match="hessian"):
        quadratic(torch.zeros(3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="x must"):
        rosenbrock(torch.zeros(1))
    with pytest.raises(ValueError, match="eigenvalues"):
        Quadratic(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="x0"):
        Quadratic(torch.ones(3), x0=torch.zeros(2))
    with pytest.raises(ValueError, match="dim"):
        Rosenbrock(1)
    with pytest.raises(ValueError, match="a = 1"):
        Rosenbrock(3, a=2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda():
    obj = Quadratic(log_spectrum(8, 10.0), generator=torch.Generator().manual_seed(3)).cuda()
    assert obj().device.type == "cuda"
    x = torch.randn(4, 8)
    torch.testing.assert_close(obj(x.cuda()).cpu(), obj.cpu()(x))
    torch.testing.assert_close(rosenbrock(x.cuda()).cpu(), rosenbrock(x))
