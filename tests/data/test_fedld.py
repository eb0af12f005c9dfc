import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook import fedsim, models
from lossbook.data.fedld import (fedld_aggregate, loss_decomposition, margin_control_loss,
                                      principal_gradient_aggregate, principal_gradient_weights)


# ----------------------------------------------------------------------------- principal-gradient aggregation
def official_style_reference(G, k_proportion):
    """Loop transcription, in float64, of the server arithmetic of the authors' code: eigenvectors
    of G G^T / m, principal directions v_j = G^T e_j, flip v_j when most clients point against it,
    project each client update on each kept direction, rescale the projection to length
    ||g_i|| s_j / sum(s), sum over directions, average over clients."""
    G = G.double()
    m = G.shape[0]
    s, E = torch.linalg.eigh(G @ G.T / m)
    s, E = s.flip(0), E.flip(1)
    k = int(m * k_proportion)
    V = [G.T @ E[:, j] for j in range(k)]
    for j in range(k):
        pos = sum(1 for i in range(m) if torch.dot(G[i], V[j]) >= 0)
        if pos < m - pos:
            V[j] = -V[j]
    out = []
    for i in range(m):
        acc = torch.zeros(G.shape[1], dtype=torch.float64)
        for j in range(k):
            proj = torch.dot(G[i], V[j]) / torch.dot(V[j], V[j]) * V[j]
            acc += proj * s[j] / s.sum() * G[i].norm() / proj.norm()
        out.append(acc)
    return torch.stack(out).mean(0)


@pytest.mark.parametrize("m,D,kp", [(10, 40, 0.8), (6, 25, 0.5), (5, 5, 1.0), (8, 100, 0.3)])
def test_aggregate_matches_official_arithmetic(m, D, kp):
    g = torch.Generator().manual_seed(m * D)
    G = torch.randn(m, D, generator=g, dtype=torch.float64) + 0.5       # a shared component, like real updates
    torch.testing.assert_close(principal_gradient_aggregate(G, k_proportion=kp),
                               official_style_reference(G, kp), rtol=1e-9, atol=1e-12)


def test_weights_reproduce_the_aggregate_and_batch():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 7, 30, generator=g, dtype=torch.float64)
    c = principal_gradient_weights(G)
    assert c.shape == (3, 7)
    torch.testing.assert_close(torch.einsum("rm,rmd->rd", c, G), principal_gradient_aggregate(G))
    for r in range(3):
        torch.testing.assert_close(principal_gradient_aggregate(G[r]), official_style_reference(G[r], 0.8))


def test_identical_clients_give_their_common_update():
    """One shared update: a single direction with all the spectrum, so the rule returns the update."""
    g = torch.randn(20, dtype=torch.float64)
    torch.testing.assert_close(principal_gradient_aggregate(g.expand(6, -1).clone()), g)
    assert principal_gradient_aggregate(torch.zeros(4, 9)).abs().max() == 0     # nothing to aggregate


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 8), D=st.integers(2, 30), seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_property_permutation_invariant_and_homogeneous(m, D, seed, scale):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(m, D, generator=g, dtype=torch.float64)
    a = principal_gradient_aggregate(G)
    perm = torch.randperm(m, generator=g)
    torch.testing.assert_close(principal_gradient_aggregate(G[perm]), a, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(principal_gradient_aggregate(scale * G), scale * a, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(principal_gradient_aggregate(-G), -a, rtol=1e-8, atol=1e-10)
    # each client's contribution has length at most ||g_i||, so the aggregate is no longer than their mean
    assert a.norm() <= G.norm(dim=1).mean() * (1 + 1e-9)


def test_fedld_aggregate_warmup_and_scalars():
    u = torch.randn(2, 5, 12)
    p = torch.full((2, 5), 0.2)
    torch.testing.assert_close(fedld_aggregate(u, p, round=0), u.mean(1))          # first round: plain mean
    torch.testing.assert_close(fedld_aggregate(u, p, round=3), principal_gradient_aggregate(u))
    torch.testing.assert_close(fedld_aggregate(u[..., :1], p, round=3), u[..., :1].mean(1))
    skew = torch.tensor([[0.9, 0.025, 0.025, 0.025, 0.025]] * 2)
    torch.testing.assert_close(fedld_aggregate(u, skew, round=0), u.mean(1))      # data weights are ignored


def test_aggregation_bad_input():
    with pytest.raises(ValueError, match="updates"):
        principal_gradient_weights(torch.randn(5))
    with pytest.raises(ValueError, match="k_proportion"):
        principal_gradient_weights(torch.randn(3, 4), k_proportion=0.0)
    with pytest.raises(ValueError, match="updates"):
        fedld_aggregate(torch.randn(3, 4), torch.ones(3), round=2)


# ----------------------------------------------------------------------------- margin control
def margin_reference(logits, target, lam):
    """Per-sample loop in float64: mean cross-entropy plus lam * log(1 + sum of squared softmax entries)."""
    B, C = logits.shape
    ce, sq = 0.0, 0.0
    for b in range(B):
        z = logits[b].tolist()
        mx = max(z)
        lse = mx + math.log(sum(math.exp(v - mx) for v in z))
        ce += lse - z[target[b]]
        sq += sum(math.exp(v - lse) ** 2 for v in z)
    return ce / B + lam * math.log(1 + sq)


@pytest.mark.parametrize("lam", [0.0, 0.03, 1.0])
def test_margin_loss_matches_loop(lam):
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(4, 9, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 6, (4, 9), generator=g)
    got = margin_control_loss(logits, target, lam=lam)
    ref = torch.tensor([margin_reference(logits[k], target[k], lam) for k in range(4)], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(margin_control_loss(logits[0], target[0], lam=lam), ref[0])


def test_lam_zero_is_cross_entropy():
    logits, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    torch.testing.assert_close(margin_control_loss(logits, target, lam=0.0), F.cross_entropy(logits, target))


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 20), C=st.integers(2, 12), seed=st.integers(0, 10_000), spread=st.floats(0.0, 50.0))
def test_property_penalty_bounds(B, C, seed, spread):
    """sum_c p_c^2 lies in [1/C, 1] per sample, so the penalty lies in [log(1 + B/C), log(1 + B)]."""
    g = torch.Generator().manual_seed(seed)
    logits = spread * torch.randn(B, C, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, (B,), generator=g)
    pen = margin_control_loss(logits, target, lam=1.0) - margin_control_loss(logits, target, lam=0.0)
    assert math.log1p(B / C) - 1e-9 <= pen <= math.log1p(B) + 1e-9


def test_penalty_pulls_towards_uniform():
    """d/dz_k sum_c p_c^2 = 2 p_k (p_k - sum_c p_c^2): the top class loses logit, the bottom ones gain."""
    z = torch.tensor([[2.0, 0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    pen = margin_control_loss(z, torch.tensor([0]), lam=1.0) - margin_control_loss(z, torch.tensor([0]), lam=0.0)
    (grad,) = torch.autograd.grad(pen, z)
    p = torch.softmax(z.detach(), -1)
    q = (p ** 2).sum()
    torch.testing.assert_close(grad, 2 * p * (p - q) / (1 + q))
    assert grad[0, 0] > 0 and grad[0, 2] < 0      # gradient descent lowers the top logit, raises the lowest


def test_gradcheck():
    z = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (2, 5))
    assert torch.autograd.gradcheck(lambda t: margin_control_loss(t, y, lam=0.3), (z,))


def test_float32_extreme_logits_finite():
    z = torch.tensor([[1e4, -1e4, 0.0], [-3e4, 3e4, 1.0]], requires_grad=True)
    loss = margin_control_loss(z, torch.tensor([1, 0]), lam=0.03)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_margin_bad_input():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="target"):
        margin_control_loss(z, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="target"):
        margin_control_loss(z, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="lam"):
        margin_control_loss(z, torch.zeros(4, dtype=torch.int64), lam=-1.0)
    with pytest.raises(ValueError, match="logits"):
        margin_control_loss(torch.randn(4), torch.zeros(4, dtype=torch.int64))


# ----------------------------------------------------------------------------- decomposition
def decomposition_reference(L, Lg, p):
    m = len(p)
    Lglob = [sum(p[j] * L[i][j] for j in range(m)) for i in range(m)]
    local = sum(p[i] * L[i][i] for i in range(m))
    shift = sum(p[i] * (Lglob[i] - L[i][i]) for i in range(m))
    total = sum(p[j] * Lg[j] for j in range(m))
    return local, shift, total - sum(p[i] * Lglob[i] for i in range(m)), total


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_decomposition_matches_loop_and_adds_up(m, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.rand(m, m, generator=g, dtype=torch.float64) * 3
    Lg = torch.rand(m, generator=g, dtype=torch.float64)
    p = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    p = p / p.sum()
    d = loss_decomposition(L, Lg, p)
    ref = decomposition_reference(L.tolist(), Lg.tolist(), p.tolist())
    for got, want in zip(d, ref):
        assert abs(float(got) - want) < 1e-12
    assert abs(float(d.local + d.shift + d.aggregation - d.total)) < 1e-12


def test_aggregation_term_of_a_quadratic_is_minus_half_the_spread():
    """Client losses L_j(w) = 1/2 ||A_j w - b_j||^2 / n_j; for w_bar = sum p_i w_i the aggregation term is
    -1/2 sum_i p_i (w_i - w_bar)^T H (w_i - w_bar), H the Hessian of L = sum_j p_j L_j: never positive."""
    g = torch.Generator().manual_seed(3)
    m, d = 4, 3
    A = torch.randn(m, 10, d, generator=g, dtype=torch.float64)
    b = torch.randn(m, 10, generator=g, dtype=torch.float64)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    w_bar = (p[:, None] * W).sum(0)
    Lj = lambda w: 0.5 * ((torch.einsum("jnd,d->jn", A, w) - b) ** 2).mean(-1)   # noqa: E731
    L = torch.stack([Lj(W[i]) for i in range(m)])
    dec = loss_decomposition(L, Lj(w_bar), p)
    H = sum(p[j] * A[j].T @ A[j] / 10 for j in range(m))
    spread = sum(p[i] * (W[i] - w_bar) @ H @ (W[i] - w_bar) for i in range(m))
    torch.testing.assert_close(dec.aggregation, -0.5 * spread)
    assert dec.aggregation < 0


def test_decomposition_broadcasts_p_and_rejects_bad_shapes():
    L, Lg, p = torch.rand(6, 2, 3, 3), torch.rand(6, 2, 3), torch.full((2, 3), 1 / 3)
    assert loss_decomposition(L, Lg, p).total.shape == (6, 2)
    with pytest.raises(ValueError, match="client_losses"):
        loss_decomposition(torch.rand(3, 4), torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match="global_losses"):
        loss_decomposition(torch.rand(3, 3), torch.rand(4), torch.rand(3))
    with pytest.raises(ValueError, match="p must"):
        loss_decomposition(torch.rand(3, 3), torch.rand(3), torch.rand(4))
    with pytest.raises(ValueError, match="non-negative"):
        loss_decomposition(torch.rand(3, 3), torch.rand(3), torch.tensor([0.5, 0.7, -0.2]))


# ----------------------------------------------------------------------------- end to end
def test_tiny_fedld_learns():
    from lossbook import data

    d = data.gaussian_mixture(600, 4, 8, sep=3.0, seed=0)
    owners = fedsim.dirichlet_label_split(d.y_train, 4, 0.5, seed=0, min_size=5)
    fed = fedsim.federate(d.x_train, d.y_train, owners, 4, 4)
    h = fedsim.simulate(lambda: models.MLP(8, (16,), 4), fed, (d.x_test, d.y_test), rounds=10, local_steps=5,
                        batch_size=16, lr=0.2, momentum=0.5, local_loss=margin_control_loss,
                        aggregate=fedld_aggregate, track_every=5, progress=False)
    dec = loss_decomposition(h.client_losses, h.global_losses, h.p)
    torch.testing.assert_close(dec.local + dec.shift + dec.aggregation, dec.total)
    assert h.test_acc[0, -1] > 0.75 and h.test_acc[0, -1] > h.test_acc[0, 0]


@pytest.mark.gpu
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 10, 50, generator=g)
    torch.testing.assert_close(principal_gradient_aggregate(G.cuda()).cpu(), principal_gradient_aggregate(G),
                               rtol=1e-4, atol=1e-6)
    z, y = torch.randn(5, 32, 10, generator=g), torch.randint(0, 10, (5, 32), generator=g)
    torch.testing.assert_close(margin_control_loss(z.cuda(), y.cuda()).cpu(), margin_control_loss(z, y),
                               rtol=1e-5, atol=1e-6)
