import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from lossbook import fedsim, models


def toy(n=120, d=5, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.arange(n) % C
    return x, y


# ----------------------------------------------------------------------------- partitioning
def test_dirichlet_split_is_a_deterministic_partition():
    y = torch.arange(500) % 10
    a = fedsim.dirichlet_label_split(y, 7, 0.5, seed=3)
    b = fedsim.dirichlet_label_split(y, 7, 0.5, seed=3)
    c = fedsim.dirichlet_label_split(y, 7, 0.5, seed=4)
    assert a.shape == (500,) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 7
    assert fedsim.label_counts(a, y, 7, 10).sum() == 500


def test_alpha_controls_skew():
    y = torch.arange(3000) % 10

    def mean_classes_per_client(alpha):
        counts = fedsim.label_counts(fedsim.dirichlet_label_split(y, 10, alpha, seed=0), y, 10, 10).float()
        share = counts / counts.sum(1, keepdim=True)
        return (share > 0.05).sum(1).float().mean().item(), share

    few, _ = mean_classes_per_client(0.05)
    many, share_iid = mean_classes_per_client(1000.0)
    assert few < 4 and many == 10
    assert torch.allclose(share_iid, torch.full_like(share_iid, 0.1), atol=0.03)   # nearly IID


def test_min_size_is_respected_or_refused():
    y = torch.arange(200) % 4
    owner = fedsim.dirichlet_label_split(y, 8, 0.1, seed=1, min_size=5)
    assert torch.bincount(owner, minlength=8).min() >= 5
    with pytest.raises(ValueError, match="min_size"):
        fedsim.dirichlet_label_split(y, 8, 0.1, min_size=30)


@pytest.mark.parametrize("kw,match", [(dict(n_clients=0), "n_clients"), (dict(alpha=0.0), "alpha"),
                                      (dict(alpha=float("nan")), "alpha")])
def test_split_bad_input(kw, match):
    args = dict(n_clients=3, alpha=1.0) | kw
    with pytest.raises(ValueError, match=match):
        fedsim.dirichlet_label_split(torch.arange(30) % 3, **args)
    with pytest.raises(ValueError, match="labels"):
        fedsim.dirichlet_label_split(torch.rand(30), 3, 1.0)


def test_federation_bookkeeping():
    x, y = toy()
    owners = torch.stack([fedsim.dirichlet_label_split(y, 4, 1.0, seed=s) for s in range(3)])
    fed = fedsim.federate(x, y, owners, 4, 3)
    assert fed.replicates == 3 and fed.counts.shape == (3, 4)
    for r in range(3):
        for i in range(4):
            a, n = fed.starts[r, i], fed.counts[r, i]
            held = fed.order[r, a:a + n]
            assert torch.equal(held.sort().values, torch.nonzero(owners[r] == i).flatten())
    torch.testing.assert_close(fed.p.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="client ids"):
        fedsim.federate(x, y, torch.full((len(y),), 4), 4, 3)
    with pytest.raises(ValueError, match="at least one point"):
        fedsim.federate(x, y, torch.zeros(len(y), dtype=torch.int64), 4, 3)


# ----------------------------------------------------------------------------- local training
def _sgd_reference(model, global_params, fed, steps, B, lr, mom, wd, seed):
    """Loop over replicates and clients with torch.optim.SGD on copies of the model, float64,
    drawing the same mini-batches as local_train from a generator with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    R, m = fed.replicates, fed.n_clients
    idx_per_step = []
    for _ in range(steps):
        u = torch.rand(R, m, B, generator=gen, dtype=torch.float32)
        pos = fed.starts.unsqueeze(-1) + (u.double() * fed.counts.unsqueeze(-1)).long()
        idx_per_step.append(fed.order.gather(1, pos.view(R, -1)).view(R, m, B))
    out = {k: torch.empty(R, m, *v.shape[1:], dtype=torch.float64) for k, v in global_params.items()}
    for r in range(R):
        for i in range(m):
            net = copy.deepcopy(model).double()
            with torch.no_grad():
                for k, p in net.named_parameters():
                    p.copy_(global_params[k][r])
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=mom, weight_decay=wd)
            for idx in idx_per_step:
                b = idx[r, i]
                loss = nn.functional.cross_entropy(net(fed.x[b]), fed.y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            for k, p in net.named_parameters():
                out[k][r, i] = p.detach()
    return out


@pytest.mark.parametrize("make", [lambda: models.MLP(5, (8,), 3),                    # fast path
                                  lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))])  # vmap path
def test_local_train_matches_torch_sgd_per_client(make):
    x, y = toy()
    x = x.double()
    owners = torch.stack([fedsim.dirichlet_label_split(y, 3, 0.5, seed=s) for s in range(2)])
    fed = fedsim.federate(x, y, owners, 3, 3)
    model, params = fedsim.stack_params(make, [0, 1])
    model, params = model.double(), {k: v.double() for k, v in params.items()}
    got = fedsim.local_train(model, params, fed, steps=3, batch_size=7, lr=0.1, momentum=0.5, weight_decay=0.01,
                             generator=torch.Generator().manual_seed(5))
    ref = _sgd_reference(model, params, fed, 3, 7, 0.1, 0.5, 0.01, 5)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)


def test_fast_path_equals_generic_path():
    x, y = toy()
    model, params = fedsim.stack_params(lambda: models.MLP(5, (8, 6), 3), [0, 1, 2])
    fast = fedsim._forward(model, params, x, shared_x=True)

    class Wrapped(nn.Module):                  # same layers, not a Sequential: takes vmap(functional_call)
        def __init__(self, seq):
            super().__init__()
            self.seq = seq

        def forward(self, z):
            return self.seq(z)

    generic = fedsim._forward(Wrapped(model), {f"seq.{k}": v for k, v in params.items()}, x, shared_x=True)
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-6)


def test_stack_params_refuses_buffers_and_is_seeded():
    with pytest.raises(ValueError, match="buffers"):
        fedsim.stack_params(lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), [0])
    _, a = fedsim.stack_params(lambda: models.MLP(4, (5,), 2), [0, 1])
    _, b = fedsim.stack_params(lambda: models.MLP(4, (5,), 2), [0, 1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"][0], a["1.weight"][1])


def test_local_train_bad_input():
    x, y = toy()
    fed = fedsim.federate(x, y, fedsim.dirichlet_label_split(y, 2, 1.0), 2, 3)
    model, params = fedsim.stack_params(lambda: models.MLP(5, (4,), 3), [0])
    with pytest.raises(ValueError, match="steps"):
        fedsim.local_train(model, params, fed, steps=0, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        fedsim.local_train(model, params, fed, steps=1, batch_size=4, lr=-0.1)


# ----------------------------------------------------------------------------- server and evaluation
@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 6), d=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_fedavg_is_the_weighted_mean(m, d, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, m, d, generator=g, dtype=torch.float64)
    p = torch.rand(2, m, generator=g, dtype=torch.float64)
    p = p / p.sum(1, keepdim=True)
    ref = torch.stack([sum(p[r, i] * u[r, i] for i in range(m)) for r in range(2)])
    torch.testing.assert_close(fedsim.fedavg(u, p), ref)
    with pytest.raises(ValueError, match="updates"):
        fedsim.fedavg(u[0], p)


def test_loss_matrix_matches_a_loop():
    x, y = toy(n=90)
    owners = torch.stack([fedsim.dirichlet_label_split(y, 3, 1.0, seed=s) for s in range(2)])
    fed = fedsim.federate(x, y, owners, 3, 3)
    model, params = fedsim.stack_params(lambda: models.MLP(5, (8,), 3), [0, 1])
    clients = fedsim.local_train(model, params, fed, steps=2, batch_size=5, lr=0.1)
    L = fedsim.loss_matrix(model, clients, fed, chunk=17)          # chunking must not matter
    Lg = fedsim.loss_matrix(model, params, fed)
    assert L.shape == (2, 3, 3) and Lg.shape == (2, 3)
    for r in range(2):
        for i in range(3):
            net = copy.deepcopy(model)
            with torch.no_grad():
                for k, p in net.named_parameters():
                    p.copy_(clients[k][r, i])
            for j in range(3):
                held = owners[r] == j
                ref = nn.functional.cross_entropy(net(x[held]), y[held])
                torch.testing.assert_close(L[r, i, j], ref, rtol=1e-5, atol=1e-6)


def test_cross_entropy_matches_torch():
    logits = torch.randn(4, 6, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (4, 6))
    ref = torch.stack([nn.functional.cross_entropy(logits[k], y[k]) for k in range(4)])
    torch.testing.assert_close(fedsim.cross_entropy(logits, y), ref)


def test_simulate_learns_and_is_reproducible():
    from lossbook import data

    d = data.gaussian_mixture(600, 4, 8, sep=3.0, seed=0)
    owners = torch.stack([fedsim.dirichlet_label_split(d.y_train, 4, 100.0, seed=s) for s in range(2)])
    fed = fedsim.federate(d.x_train, d.y_train, owners, 4, 4)
    kw = dict(rounds=8, local_steps=5, batch_size=16, lr=0.2, momentum=0.5, track_every=4, progress=False)
    make = lambda: models.MLP(8, (16,), 4)   # noqa: E731
    h = fedsim.simulate(make, fed, (d.x_test, d.y_test), **kw)
    h2 = fedsim.simulate(make, fed, (d.x_test, d.y_test), **kw)
    assert h.test_acc.shape == (2, 8) and h.tracked == [3, 7]
    assert h.client_losses.shape == (2, 2, 4, 4) and h.global_losses.shape == (2, 2, 4)
    assert (h.test_acc[:, -1] > 0.8).all() and h.test_acc[:, -1].mean() > h.test_acc[:, 0].mean()
    assert torch.equal(h.test_acc, h2.test_acc)


def test_side_by_side_equals_separate_runs():
    from lossbook import data

    d = data.gaussian_mixture(300, 3, 6, sep=3.0, seed=1)
    owners = torch.stack([fedsim.dirichlet_label_split(d.y_train, 3, 0.5, seed=s) for s in range(2)])
    kw = dict(rounds=3, local_steps=2, batch_size=8, lr=0.1, momentum=0.5, track_every=3, progress=False)
    make = lambda: models.MLP(6, (8,), 3)   # noqa: E731
    half = lambda u, p, round: u.mean(1) * 0.5   # noqa: E731  (a second, different server rule)
    sq = lambda z, y: fedsim.cross_entropy(z, y) ** 2   # noqa: E731
    loss, agg = fedsim.side_by_side([(fedsim.cross_entropy, fedsim.fedavg), (sq, half)], 2, 3)
    both = fedsim.simulate(make, fedsim.federate(d.x_train, d.y_train, owners.repeat(2, 1), 3, 3),
                           (d.x_test, d.y_test), local_loss=loss, aggregate=agg, seeds=[0, 1, 0, 1],
                           batch_groups=2, **kw)
    fed = fedsim.federate(d.x_train, d.y_train, owners, 3, 3)
    first = fedsim.simulate(make, fed, (d.x_test, d.y_test), seeds=[0, 1], **kw)
    second = fedsim.simulate(make, fed, (d.x_test, d.y_test), local_loss=sq, aggregate=half, seeds=[0, 1], **kw)
    for sel, ref in ((slice(0, 2), first), (slice(2, 4), second)):
        part = both.select(sel)
        torch.testing.assert_close(part.test_acc, ref.test_acc)
        torch.testing.assert_close(part.client_losses, ref.client_losses)
        for k in ref.params:
            torch.testing.assert_close(part.params[k], ref.params[k])
    with pytest.raises(ValueError, match="batch_groups"):
        fedsim.simulate(make, fed, (d.x_test, d.y_test), seeds=[0, 1], batch_groups=3, **kw)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x, y = toy()
    owners = fedsim.dirichlet_label_split(y, 3, 1.0).unsqueeze(0)
    fed = fedsim.federate(x, y, owners, 3, 3)
    model, params = fedsim.stack_params(lambda: models.MLP(5, (8,), 3), [0])
    cpu = fedsim.loss_matrix(model, params, fed)
    gpu = fedsim.loss_matrix(model.cuda(), {k: v.cuda() for k, v in params.items()}, fed.to("cuda"))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    clients = fedsim.local_train(model, {k: v.cuda() for k, v in params.items()}, fed.to("cuda"), steps=2,
                                 batch_size=4, lr=0.1, generator=torch.Generator("cuda").manual_seed(0))
    assert clients["1.weight"].is_cuda and torch.isfinite(clients["1.weight"]).all()
