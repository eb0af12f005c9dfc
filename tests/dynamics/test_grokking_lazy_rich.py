import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.dynamics.grokking_lazy_rich import (first_below, kernel_regression_mse, loss_gradient, network,
                                                  quadratic_task, train_lazy_rich, two_layer_ntk)
from lossbook.ntk import empirical_ntk, kernel_alignment

F64 = torch.float64


def small(seed=0, d=4, p=6, n=5):
    g = torch.Generator().manual_seed(seed)
    task = quadratic_task(d, p, 3, generator=g, dtype=F64)
    return task, torch.randn(n, d, generator=g, dtype=F64)


def loop_f(w, x, alpha, eps):
    """Loop transcription of f(x) = alpha/N sum_i phi(w_i.x), phi(h) = h + eps h^2 / 2."""
    out = []
    for xm in x.tolist():
        s = 0.0
        for wi in w.tolist():
            h = sum(a * b for a, b in zip(wi, xm))
            s += h + 0.5 * eps * h * h
        out.append(alpha * s / len(w))
    return torch.tensor(out, dtype=F64)


def loop_gd(w0, x, y, alpha, eps, c, steps):
    """Loop transcription of the GD update w_i -= 2c/(P alpha) sum_mu r_mu phi'(w_i.x_mu) x_mu."""
    W = [list(r) for r in w0.tolist()]
    X = x.tolist()
    P, N, D = len(X), len(W), len(X[0])
    f0 = loop_f(w0, x, alpha, eps).tolist()
    for _ in range(steps):
        f = loop_f(torch.tensor(W, dtype=F64), x, alpha, eps).tolist()
        r = [f[m] - f0[m] - float(y[m]) for m in range(P)]
        new = []
        for wi in W:
            g = [0.0] * D
            for m in range(P):
                h = sum(a * b for a, b in zip(wi, X[m]))
                for j in range(D):
                    g[j] += r[m] * (1 + eps * h) * X[m][j]
            new.append([wi[j] - 2 * c / (P * alpha) * g[j] for j in range(D)])
        W = new
    return torch.tensor(W, dtype=F64)


def test_network_matches_loop_and_batches():
    task, w = small()
    x = task.x_train[0]
    for alpha in (0.5, 3.0):
        torch.testing.assert_close(network(w, x, alpha, 0.3), loop_f(w, x, alpha, 0.3), rtol=1e-12, atol=1e-14)
    wb = torch.stack([w, 2 * w])
    out = network(wb, x, torch.tensor([1.0, 2.0], dtype=F64), 0.3)
    torch.testing.assert_close(out[1], loop_f(2 * w, x, 2.0, 0.3), rtol=1e-12, atol=1e-14)


def test_gradient_matches_autograd_and_gradcheck():
    task, w = small(1)
    x, y = task.x_train[0], task.y_train[0]
    w0 = w.clone()
    w = (w + 0.1).requires_grad_(True)
    loss = ((network(w, x, 2.0, 0.4) - network(w0, x, 2.0, 0.4) - y) ** 2).mean()
    (g,) = torch.autograd.grad(loss, w)
    r = network(w.detach(), x, 2.0, 0.4) - network(w0, x, 2.0, 0.4) - y
    torch.testing.assert_close(loss_gradient(w.detach(), x, r, 2.0, 0.4), g, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda v: network(v, x, 2.0, 0.4), (w,))


def test_closed_form_ntk_matches_torch_func():
    task, w = small(2)
    x1, x2 = task.x_train[0], task.x_test[0]
    K = empirical_ntk(lambda p, xs: network(p["w"], xs[None], 1.7, 0.25)[0], {"w": w}, x1, x2)
    torch.testing.assert_close(two_layer_ntk(w, x1, x2, alpha=1.7, eps=0.25), K, rtol=1e-12, atol=1e-14)


def test_training_matches_loop_reference():
    task, w = small(3, d=3, p=5, n=4)
    alphas = [0.7, 2.5]
    run = train_lazy_rich(task, alphas, width=4, eps=0.3, steps=4, lr_scale=0.5, log_every=1, w0=w[None])
    for k, a in enumerate(alphas):
        ref = loop_gd(w, task.x_train[0], task.y_train[0], a, 0.3, 0.5, 4)
        torch.testing.assert_close(run.w[k], ref, rtol=1e-10, atol=1e-12)
        r = loop_f(ref, task.x_train[0], a, 0.3) - loop_f(w, task.x_train[0], a, 0.3) - task.y_train[0]
        assert abs(float(run.train_loss[k, -1]) - float((r ** 2).mean())) < 1e-12
    torch.testing.assert_close(run.times, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=F64))


def test_kappa_identity_exact():
    """Proposition glr-prop-kappa: f - f0 = 1/N sum[(1 + eps h0) delta.x + kappa/2 (delta.x)^2]."""
    task, w = small(4)
    run = train_lazy_rich(task, [3.0], width=5, eps=0.3, steps=7, w0=w[None])
    delta, x = 3.0 * (run.w[0] - w), task.x_test[0]
    h0, u = x @ w.T, x @ delta.T
    kform = ((1 + 0.3 * h0) * u + 0.1 / 2 * u * u).mean(-1)
    torch.testing.assert_close(network(run.w[0], x, 3.0, 0.3) - network(w, x, 3.0, 0.3), kform, rtol=1e-12, atol=1e-13)


def test_special_cases():
    # eps = 0: the network is linear in x, its NTK is alpha^2/N (x.x') whatever the weights
    task, w = small(5)
    x = task.x_train[0]
    torch.testing.assert_close(two_layer_ntk(w, x, alpha=2.0, eps=0.0), 4.0 / 5 * x @ x.T)
    # the task: ||beta||^2 = D and y = (beta.x)^2 / 2
    t = quadratic_task(7, 5, 3, n_tasks=2, generator=0, dtype=F64)
    torch.testing.assert_close(t.beta.norm(dim=-1) ** 2, torch.full((2,), 7.0, dtype=F64))
    torch.testing.assert_close(t.y_test, 0.5 * torch.einsum("spd,sd->sp", t.x_test, t.beta) ** 2)
    # kernel regression with the linear kernel recovers a linear target from more points than dimensions
    z = torch.randn(12, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    b = torch.randn(3, dtype=F64)
    mse = kernel_regression_mse(z[:9] @ z[:9].T, z[:9] @ b, z[9:] @ z[:9].T, z[9:] @ b, ridge=1e-10)
    assert float(mse) < 1e-12
    # ... and on a full-rank kernel it equals the loop solution k(x)^T K^{-1} y
    K = torch.exp(-torch.cdist(z[:9], z[:9]) ** 2)
    Kt = torch.exp(-torch.cdist(z[9:], z[:9]) ** 2)
    y9, y3 = torch.sin(z[:9, 0]), torch.sin(z[9:, 0])
    coef = torch.linalg.solve(K, y9)
    ref = sum((float(Kt[q] @ coef) - float(y3[q])) ** 2 for q in range(3)) / 3
    assert abs(float(kernel_regression_mse(K, y9, Kt, y3)) - ref) < 1e-10
    # first_below: first index, inf when never
    times = torch.tensor([0.0, 10.0, 20.0, 30.0])
    curve = torch.tensor([[5.0, 3.0, 1.0, 0.5], [5.0, 4.0, 4.0, 4.0]])
    out = first_below(curve, times, torch.tensor([2.0, 2.0]))
    assert float(out[0]) == 20.0 and math.isinf(float(out[1]))


@settings(max_examples=20, deadline=None)
@given(st.floats(0.2, 20.0), st.floats(0.0, 1.0), st.integers(0, 500))
def test_function_speed_is_alpha_free(alpha, eps, seed):
    """eta K with eta = N/alpha^2 does not depend on alpha (the lazy/rich knob acts on the weights only)."""
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64) / 2
    K1 = two_layer_ntk(w, x, alpha=alpha, eps=eps) * 6 / alpha**2
    K2 = two_layer_ntk(w, x, alpha=1.0, eps=eps) * 6
    torch.testing.assert_close(K1, K2, rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(K2).min()) > -1e-10


def test_bad_input():
    task, w = small()
    with pytest.raises(ValueError, match="alpha"):
        network(w, task.x_train[0], -1.0, 0.1)
    with pytest.raises(ValueError, match="x must"):
        network(w, torch.zeros(3, 7, dtype=F64), 1.0, 0.1)
    with pytest.raises(ValueError, match="d must"):
        quadratic_task(0, 5, 5)
    with pytest.raises(ValueError, match="steps"):
        train_lazy_rich(task, [1.0], width=5, eps=0.1, steps=-1)
    with pytest.raises(ValueError, match="w0"):
        train_lazy_rich(task, [1.0], width=5, eps=0.1, steps=1, w0=torch.zeros(1, 3, 4, dtype=F64))
    with pytest.raises(ValueError, match="ridge"):
        kernel_regression_mse(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2), ridge=-1)
    with pytest.raises(ValueError, match="shapes"):
        kernel_regression_mse(torch.eye(3), torch.zeros(2), torch.eye(3), torch.zeros(3))
    with pytest.raises(ValueError, match="points"):
        first_below(torch.zeros(2, 3), torch.zeros(4), 1.0)


def test_lazy_vs_rich_learns():
    """Tiny version of the chapter: alpha = 1 generalises, the lazy limit does not, and its kernel barely moves."""
    task = quadratic_task(16, 96, 200, n_tasks=1, generator=0)        # P = 96 < D(D+1)/2 = 136 quadratic features
    run = train_lazy_rich(task, [1.0, 1000.0], width=16, eps=0.35, steps=300, lr_scale=4.0, log_every=20,
                          ntk_every=300, ntk_points=60, generator=1)
    var = float(task.y_test.var())
    assert float(run.train_loss[1, -1]) < 0.05 * var > float(run.train_loss[0, -1])                   # the lazy network fits the training set
    assert float(run.test_loss[0, -1]) < 0.05 * var and float(run.test_loss[1, -1]) > 0.3 * var
    dA = run.alignment[:, -1] - run.alignment[:, 0]
    assert float(dA[0]) > 100 * abs(float(dA[1]))
    assert float(run.kernel_distance[1, -1]) < 1e-4 < float(run.kernel_distance[0, -1])
    assert float(run.beta_overlap[0, -1]) > 3 * float(run.beta_overlap[0, 0])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    task = quadratic_task(6, 20, 10, n_tasks=2, generator=0, dtype=F64)
    w0 = torch.randn(2, 8, 6, dtype=F64)
    cpu = train_lazy_rich(task, [1.0, 4.0], width=8, eps=0.3, steps=20, ntk_every=10, w0=w0)
    gpu_task = type(task)(*(t.cuda() for t in task))
    gpu = train_lazy_rich(gpu_task, [1.0, 4.0], width=8, eps=0.3, steps=20, ntk_every=10, w0=w0.cuda())
    torch.testing.assert_close(gpu.test_loss.cpu(), cpu.test_loss)
    torch.testing.assert_close(gpu.alignment.cpu(), cpu.alignment)
    torch.testing.assert_close(first_below(gpu.test_loss, gpu.times, 0.3).cpu(), first_below(cpu.test_loss, cpu.times, 0.3))
    assert kernel_alignment(two_layer_ntk(gpu.w, gpu_task.x_test.repeat(2, 1, 1), eps=0.3),
                            gpu_task.y_test.repeat(2, 1)).is_cuda
