import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.dynamics.robust_matrix_recovery import (make_problem, measure, recovery_loss, recovery_subgradient,
                                                      relative_error, small_init, step_sizes, subgradient_method)

F64 = torch.float64


def gen(k):
    return torch.Generator().manual_seed(k)


def ref_subgradient(U, A, y, loss):
    """Loop transcription in float64: D = (2/m) sum_i psi'(rho_i) A_i U, rho_i = <A_i, UU^T> - y_i."""
    U, A, y = U.double(), A.double(), y.double()
    m = A.shape[0]
    X = U @ U.T
    D = torch.zeros_like(U)
    total = 0.0
    for i in range(m):
        rho = float((A[i] * X).sum()) - float(y[i])
        w = math.copysign(1.0, rho) if (loss == "l1" and rho != 0) else (0.0 if loss == "l1" else rho)
        D += (2.0 / m) * w * (A[i] @ U)
        total += abs(rho) if loss == "l1" else 0.5 * rho * rho
    return D, total / m


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_subgradient_and_loss_match_loop_reference(loss):
    P = make_problem(6, 2, 50, outlier_frac=0.2, outlier_scale=10.0, generator=0)
    U = torch.randn(6, 4, generator=gen(1), dtype=F64)
    D_ref, f_ref = ref_subgradient(U, P.A, P.y, loss)
    torch.testing.assert_close(recovery_subgradient(U, P.A, P.y, loss), D_ref, rtol=1e-12, atol=1e-12)
    assert abs(float(recovery_loss(U, P.A, P.y, loss)) - f_ref) < 1e-10


def test_measure_matches_loop_and_general_A():
    P = make_problem(5, 1, 30, generator=2)
    X = torch.randn(5, 5, generator=gen(3), dtype=F64)
    X = X + X.T
    ref = torch.tensor([float((P.A[i] * X).sum()) for i in range(30)], dtype=F64)
    torch.testing.assert_close(measure(P.A, X), ref, rtol=1e-12, atol=1e-12)
    # for symmetric X the symmetrized matrix measures the same as any non-symmetric G with the same symmetric part
    G = torch.randn(30, 5, 5, generator=gen(4), dtype=F64)
    torch.testing.assert_close(measure(G, X), measure(0.5 * (G + G.mT), X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_autograd_matches_subgradient_and_gradcheck(loss):
    P = make_problem(4, 1, 20, outlier_frac=0.25, generator=5)
    U = torch.randn(4, 2, generator=gen(6), dtype=F64, requires_grad=True)
    recovery_loss(U, P.A, P.y, loss).backward()
    torch.testing.assert_close(U.grad, recovery_subgradient(U.detach(), P.A, P.y, loss), rtol=1e-12, atol=1e-12)
    # away from the kinks the l1 loss is smooth too: residuals here are bounded away from 0
    assert float(measure(P.A, U.detach() @ U.detach().T).sub(P.y).abs().min()) > 1e-4
    assert torch.autograd.gradcheck(lambda V: recovery_loss(V, P.A, P.y, loss), (U.detach().clone().requires_grad_(),))


def test_special_cases():
    P = make_problem(6, 2, 80, generator=7)                       # no outliers
    # l2 gradient vanishes at the truth; l1 sub-gradient vanishes at U = 0 (a stationary point: D = G U)
    assert float(recovery_subgradient(P.U_star, P.A, P.y, "l2").abs().max()) < 1e-12
    assert float(recovery_subgradient(torch.zeros(6, 3, dtype=F64), P.A, P.y, "l1").abs().max()) == 0.0
    assert float(recovery_loss(P.U_star, P.A, P.y, "l1")) < 1e-12
    assert float(relative_error(P.U_star, P.X_star)) < 1e-14
    torch.testing.assert_close(step_sizes(4, 0.5, 0.5), torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=F64))
    torch.testing.assert_close(step_sizes(3, 0.2, 1.0), torch.full((3,), 0.2, dtype=F64))


def test_expected_subgradient_lemma():
    """E[sign(<G,E> - s) sym(G)] = phi(||E||) E/||E||, phi = sqrt(2/pi)[(1-p) + p e/sqrt(e^2+tau^2)]."""
    p, tau, n = 0.4, 1.5, 150_000
    P = make_problem(3, 1, n, outlier_frac=p, outlier_scale=tau, generator=8)
    s = P.y - measure(P.A, P.X_star)
    E = torch.tensor([[0.8, 0.3, 0.0], [0.3, -0.4, 0.1], [0.0, 0.1, 0.2]], dtype=F64)
    mc = (torch.sign(measure(P.A, E) - s)[:, None, None] * P.A).mean(0)
    e = torch.linalg.matrix_norm(E)
    phi = math.sqrt(2 / math.pi) * ((1 - p) + p * e / torch.sqrt(e**2 + tau**2))
    torch.testing.assert_close(mc, phi * E / e, rtol=0, atol=0.01)


def test_make_problem_structure():
    P = make_problem(8, 3, 100, batch=(2, 3), outlier_frac=torch.tensor([[0.0], [0.3]]), outlier_scale=50.0,
                     cond=4.0, generator=9)
    assert P.A.shape == (2, 3, 100, 8, 8) and P.y.shape == (2, 3, 100) and P.U_star.shape == (2, 3, 8, 3)
    torch.testing.assert_close(P.A, P.A.mT)
    assert P.outliers[0].sum() == 0 and bool((P.outliers[1].sum(-1) == 30).all())
    clean = measure(P.A, P.X_star)
    torch.testing.assert_close(torch.where(P.outliers, clean, P.y), clean)      # only the outliers differ
    ev = torch.linalg.eigvalsh(P.X_star[1, 2])
    torch.testing.assert_close(ev[-3:], torch.tensor([0.25, 0.5, 1.0], dtype=F64))
    assert float(ev[:-3].abs().max()) < 1e-12
    Q = make_problem(8, 3, 100, batch=(2, 3), outlier_frac=torch.tensor([[0.0], [0.3]]), outlier_scale=50.0,
                     cond=4.0, generator=9)
    assert torch.equal(P.y, Q.y)


def test_small_init_masks_columns_and_padding_is_exact():
    U0 = small_init(12, torch.tensor([2, 5]), torch.tensor([1e-3, 1.0]), batch=(2,), width=12, generator=10)
    assert U0.shape == (2, 12, 12)
    assert float(U0[0, :, 2:].abs().max()) == 0 and float(U0[1, :, 5:].abs().max()) == 0
    assert float(U0[0].abs().max()) < 1e-2 and float(U0[1, :, :5].abs().max()) > 0.1
    # a factor padded with zero columns runs exactly like the narrow one
    P = make_problem(6, 2, 60, outlier_frac=0.2, generator=11)
    narrow = small_init(6, 3, 1e-2, generator=12)
    wide = torch.cat([narrow, torch.zeros(6, 3, dtype=F64)], -1)
    a = subgradient_method(P.A, P.y, narrow, iters=50, eta0=0.3, decay=0.99).U
    b = subgradient_method(P.A, P.y, wide, iters=50, eta0=0.3, decay=0.99).U
    torch.testing.assert_close(b[:, :3], a, rtol=1e-10, atol=1e-12)
    assert float(b[:, 3:].abs().max()) == 0


def test_batched_runs_equal_separate_runs():
    P = make_problem(5, 1, 40, batch=(3,), outlier_frac=torch.tensor([0.0, 0.2, 0.4]), generator=13)
    U0 = small_init(5, 5, 1e-2, batch=(3,), generator=14)
    eta0 = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    res = subgradient_method(P.A, P.y, U0, iters=40, eta0=eta0, decay=0.98, X_star=P.X_star, record_every=10)
    assert res.errors.shape == (3, 5) and res.iters.tolist() == [0, 10, 20, 30, 40] and res.steps.shape == (3, 5)
    for k in range(3):
        one = subgradient_method(P.A[k], P.y[k], U0[k], iters=40, eta0=float(eta0[k]), decay=0.98, X_star=P.X_star[k],
                                 record_every=10)
        torch.testing.assert_close(res.U[k], one.U, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(res.errors[k], one.errors, rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(c=st.floats(0.1, 10.0), seed=st.integers(0, 2**31 - 1), k=st.integers(1, 4))
def test_property_homogeneity(c, seed, k):
    """Scaling U by c and y by c^2 scales every residual by c^2: the l1 sub-gradient scales by c,
    the l2 gradient by c^3."""
    P = make_problem(4, 1, 24, outlier_frac=0.25, generator=seed)
    U = torch.randn(4, k, generator=gen(seed + 1), dtype=F64)
    for loss, power in (("l1", 1), ("l2", 3)):
        torch.testing.assert_close(recovery_subgradient(c * U, P.A, c**2 * P.y, loss),
                                   c**power * recovery_subgradient(U, P.A, P.y, loss), rtol=1e-9, atol=1e-12)
    # the l1 sub-gradient never exceeds (2/m) sum ||A_i U||: each measurement pulls with weight at most 1
    bound = 2 * torch.linalg.matrix_norm(P.A @ U).mean()
    assert float(torch.linalg.matrix_norm(recovery_subgradient(U, P.A, P.y, "l1"))) <= float(bound) + 1e-12


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_property_l1_ignores_outlier_size(scale, seed):
    """With the outlier signs fixed, the l1 sub-gradient does not depend on how large the outliers are."""
    P = make_problem(4, 1, 30, outlier_frac=0.3, generator=seed)
    U = 0.3 * torch.randn(4, 2, generator=gen(seed + 2), dtype=F64)
    clean = measure(P.A, P.X_star)
    big = torch.where(P.outliers, clean + 1e4 * torch.sign(P.y - clean + 1e-300), P.y)
    bigger = torch.where(P.outliers, clean + 1e4 * (1 + scale) * torch.sign(P.y - clean + 1e-300), P.y)
    torch.testing.assert_close(recovery_subgradient(U, P.A, big), recovery_subgradient(U, P.A, bigger), rtol=0, atol=0)


def test_bad_input():
    P = make_problem(4, 1, 10, generator=15)
    U = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="r must be"):
        make_problem(3, 4, 10)
    with pytest.raises(ValueError, match="outlier_frac"):
        make_problem(3, 1, 10, outlier_frac=1.0)
    with pytest.raises(ValueError, match="outlier_frac"):
        make_problem(3, 1, 10, batch=(2,), outlier_frac=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="cond"):
        make_problem(3, 1, 10, cond=0.5)
    with pytest.raises(ValueError, match="m must be"):
        make_problem(3, 1, 0)
    with pytest.raises(ValueError, match="loss"):
        recovery_loss(U, P.A, P.y, "huber")
    with pytest.raises(ValueError, match="U must"):
        recovery_subgradient(torch.zeros(5, 2, dtype=F64), P.A, P.y)
    with pytest.raises(ValueError, match="y must"):
        recovery_subgradient(U, P.A, P.y[:-1])
    with pytest.raises(ValueError, match="A must"):
        measure(torch.zeros(10, 4, 3), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="eta0"):
        step_sizes(5, -0.1, 0.9)
    with pytest.raises(ValueError, match="decay"):
        step_sizes(5, 0.1, 1.5)
    with pytest.raises(ValueError, match="iters"):
        subgradient_method(P.A, P.y, U, iters=0, eta0=0.1)
    with pytest.raises(ValueError, match="alpha"):
        small_init(4, 2, 0.0)
    with pytest.raises(ValueError, match="r_prime"):
        small_init(4, 5, 1e-3)
    with pytest.raises(ValueError, match="broadcast"):
        subgradient_method(P.A, P.y, torch.zeros(3, 4, 2, dtype=F64), iters=2, eta0=torch.tensor([0.1, 0.2]))


def test_learns_l1_recovers_l2_fails():
    """The tiny version of the chapter's claim: 25% gross outliers, over-parameterized factor, small start."""
    P = make_problem(8, 1, 160, batch=(2,), outlier_frac=0.25, outlier_scale=100.0, generator=16)
    U0 = small_init(8, 8, 1e-3, batch=(2,), generator=17)
    l1 = subgradient_method(P.A, P.y, U0, iters=600, eta0=0.3, decay=0.99, X_star=P.X_star, record_every=600)
    l2 = subgradient_method(P.A, P.y, U0, iters=600, eta0=0.01, decay=1.0, loss="l2", X_star=P.X_star, record_every=600)
    assert bool((l1.errors[..., -1] < 1e-2).all()), l1.errors[..., -1]
    assert bool((l2.errors[..., -1] > 0.3).all()), l2.errors[..., -1]


@pytest.mark.gpu
def test_cuda_matches_cpu():
    P = make_problem(6, 2, 60, batch=(2,), outlier_frac=0.2, generator=18)
    U0 = small_init(6, 6, 1e-3, batch=(2,), generator=19)
    cpu = subgradient_method(P.A, P.y, U0, iters=100, eta0=0.3, decay=0.99, X_star=P.X_star, record_every=50)
    dev = torch.device("cuda")
    gpu = subgradient_method(P.A.to(dev), P.y.to(dev), U0.to(dev), iters=100, eta0=0.3, decay=0.99,
                             X_star=P.X_star.to(dev), record_every=50)
    assert gpu.U.device.type == "cuda" and gpu.errors.device.type == "cuda"
    torch.testing.assert_close(gpu.U.cpu(), cpu.U, rtol=1e-6, atol=1e-9)
    Pg = make_problem(6, 2, 60, outlier_frac=0.2, generator=18, device=dev, dtype=torch.float32)
    assert Pg.A.device.type == "cuda" and Pg.A.dtype == torch.float32
