import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.episodes import sample_episodes
from lossbook.representation.transductive_fewshot import (bound_optimizer, center_l2, energy, episode_accuracy,
                                                          kmeans_transductive, knn_affinity, nearest_prototype,
                                                          prototypes)


def _task(E=4, n_way=3, k=2, q=5, D=4, seed=0, sep=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centers = sep * torch.randn(E, n_way, 1, D, generator=g, dtype=dtype)
    s = (centers + torch.randn(E, n_way, k, D, generator=g, dtype=dtype)).reshape(E, n_way * k, D)
    qq = (centers + torch.randn(E, n_way, q, D, generator=g, dtype=dtype)).reshape(E, n_way * q, D)
    return s, torch.arange(n_way).repeat_interleave(k).expand(E, -1), qq, torch.arange(n_way).repeat_interleave(q).expand(E, -1)


def energy_loop(Y, f, m, W, lam, T):
    """Plain float64 transcription of the relaxed objective for one episode."""
    P, N = len(Y), len(m)
    e = 0.0
    for p in range(P):
        for k in range(N):
            y = float(Y[p, k])
            e += (y * math.log(y) if y > 0 else 0.0) + y * float(((f[p] - m[k]) ** 2).sum()) / T
    for p in range(P):
        for q in range(P):
            e -= 0.5 * lam * float(W[p, q]) * float(Y[p] @ Y[q])
    return e


def test_energy_matches_loop_reference():
    s, sl, q, _ = _task()
    f = torch.cat([s, q], 1)
    Y = torch.softmax(torch.randn(4, f.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), -1)
    m, W = prototypes(s, sl, 3), knn_affinity(f, 3)
    got = energy(Y, f, m, W, lam=0.7, temperature=0.5)
    ref = torch.tensor([energy_loop(Y[e], f[e], m[e], W[e], 0.7, 0.5) for e in range(4)], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_bound_update_matches_loop_reference():
    """One bound step, transcribed point by point: y_qk ∝ exp(-|f_q - m_k|^2 + lam * sum_p w_qp y_pk)."""
    s, sl, q, _ = _task(E=2)
    lam = 0.8
    out = bound_optimizer(s, sl, q, 3, lam=lam, knn=3, outer=0, inner=0)   # initial assignments only
    f = torch.cat([s, q], 1)
    W, m = knn_affinity(f, 3), prototypes(s, sl, 3)
    Y0 = torch.cat([F.one_hot(sl, 3).double(), out.assignments], 1)
    one = bound_optimizer(s, sl, q, 3, lam=lam, knn=3, outer=1, inner=1)
    S = s.shape[1]
    for e in range(2):
        for i in range(q.shape[1]):
            logits = [-float(((q[e, i] - m[e, k]) ** 2).sum()) + lam * sum(float(W[e, S + i, p] * Y0[e, p, k])
                      for p in range(f.shape[1])) for k in range(3)]
            z = [math.exp(v - max(logits)) for v in logits]
            ref = torch.tensor([v / sum(z) for v in z], dtype=torch.float64)
            torch.testing.assert_close(one.assignments[e, i], ref, rtol=1e-10, atol=1e-12)


def test_bound_step_minimises_the_bound():
    """The closed form beats random points of the simplex on the linearised bound."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.rand(6, 4, generator=g, dtype=torch.float64)
    bound = lambda Y: (torch.special.xlogy(Y, Y) + Y * a - Y * b).sum(-1)   # noqa: E731
    ystar = torch.softmax(-a + b, -1)
    rand = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((2000, 6))
    assert (bound(ystar) <= bound(rand) + 1e-12).all()


def test_special_cases():
    s, sl, q, ql = _task(E=6, sep=6.0)
    assert (episode_accuracy(nearest_prototype(s, sl, q, 3), ql) == 1).all()          # well separated
    # outer = inner = 0: the soft nearest-prototype classifier
    r = bound_optimizer(s, sl, q, 3, outer=0, inner=0)
    assert torch.equal(r.labels, nearest_prototype(s, sl, q, 3)) and r.energy_trace.shape == (6, 1)
    # iters = 0: K-means is the nearest-prototype classifier
    assert torch.equal(kmeans_transductive(s, sl, q, 3, iters=0), nearest_prototype(s, sl, q, 3))
    # lam = 0, tiny temperature: the bound optimizer becomes hard K-means
    hard = bound_optimizer(s, sl, q, 3, lam=0.0, temperature=1e-4, outer=10, inner=1).labels
    assert torch.equal(hard, kmeans_transductive(s, sl, q, 3, iters=10))
    # prototypes: class means
    torch.testing.assert_close(prototypes(s, sl, 3)[:, 1], s[:, 2:4].mean(1))
    c = center_l2(torch.randn(5, 7), torch.ones(7))
    torch.testing.assert_close(c.norm(dim=-1), torch.ones(5))


def test_knn_affinity():
    s, sl, q, _ = _task(E=3)
    f = torch.cat([s, q], 1)
    W = knn_affinity(f, 4)
    torch.testing.assert_close(W, W.transpose(1, 2))
    assert (W.diagonal(dim1=1, dim2=2) == 0).all() and ((W == 0) | (W == 0.5) | (W == 1)).all()
    assert (W.sum(-1) >= 2).all()                                       # row p has its own k, halved at worst
    Wp = knn_affinity(f, 4, psd=True)
    assert (torch.linalg.eigvalsh(Wp).amin(-1) > -1e-10).all()
    off = ~torch.eye(f.shape[1], dtype=torch.bool)
    assert torch.equal(Wp[:, off], W[:, off])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 3.0), st.floats(0.05, 2.0), st.integers(2, 6))
def test_energy_never_increases_with_psd_affinity(seed, lam, temp, knn):
    s, sl, q, _ = _task(E=5, seed=seed, sep=1.0)
    r = bound_optimizer(s, sl, q, 3, lam=lam, temperature=temp, knn=knn, psd=True, outer=4, inner=4)
    tr = r.energy_trace
    assert (tr.diff(dim=1) <= 1e-9 * (1 + tr[:, :-1].abs())).all()
    torch.testing.assert_close(r.assignments.sum(-1), torch.ones_like(r.assignments[..., 0]))


def test_energy_gradcheck():
    s, sl, q, _ = _task(E=2, k=1, q=2)
    f = torch.cat([s, q], 1)
    m, W = prototypes(s, sl, 3), knn_affinity(f, 2)
    Y = torch.softmax(torch.randn(2, f.shape[1], 3, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda Y: energy(Y, f, m, W, lam=0.5), (Y,))
    # the bound update is a stationary point of the linearised bound: its gradient is constant per point
    a = torch.randn(5, 3, dtype=torch.float64)
    y = torch.softmax(-a, -1).requires_grad_()
    (torch.special.xlogy(y, y) + y * a).sum().backward()
    torch.testing.assert_close(y.grad - y.grad[:, :1], torch.zeros_like(y.grad))


def test_bad_input():
    s, sl, q, _ = _task()
    with pytest.raises(ValueError, match="support_labels"):
        bound_optimizer(s, sl + 5, q, 3)
    with pytest.raises(ValueError, match="lam"):
        bound_optimizer(s, sl, q, 3, lam=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        bound_optimizer(s, sl, q, 3, temperature=0.0)
    with pytest.raises(ValueError, match="k must"):
        knn_affinity(torch.cat([s, q], 1), 100)
    with pytest.raises(ValueError, match="query"):
        bound_optimizer(s, sl, q[0], 3)
    with pytest.raises(ValueError, match="agree"):
        bound_optimizer(s, sl, q[:2], 3)
    with pytest.raises(ValueError, match="W must"):
        bound_optimizer(s, sl, q, 3, W=torch.zeros(4, 3, 3))
    with pytest.raises(ValueError, match="n_way"):
        prototypes(s, sl, 0)


def test_learns_on_clustered_episodes():
    """Transduction helps when the one shot is a poor prototype but the queries cluster well."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([3 * torch.eye(4)[c].expand(40, -1) + 0.9 * torch.randn(40, 4, generator=g) for c in range(4)])
    y = torch.arange(4).repeat_interleave(40)
    ep = sample_episodes(x, y, n_way=4, k_shot=1, n_query=15, n_episodes=200, generator=g)
    args = (ep.support, ep.support_labels, ep.query, 4)
    proto = episode_accuracy(nearest_prototype(*args), ep.query_labels).mean()
    bo = episode_accuracy(bound_optimizer(*args, lam=0.5).labels, ep.query_labels).mean()
    assert bo > proto + 0.03


@pytest.mark.gpu
def test_cuda_matches_cpu():
    s, sl, q, _ = _task(E=8)
    cpu = bound_optimizer(s, sl, q, 3, psd=True)
    gpu = bound_optimizer(s.cuda(), sl.cuda(), q.cuda(), 3, psd=True)
    assert gpu.labels.is_cuda
    torch.testing.assert_close(gpu.assignments.cpu(), cpu.assignments, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gpu.energy_trace.cpu(), cpu.energy_trace, rtol=1e-6, atol=1e-6)
