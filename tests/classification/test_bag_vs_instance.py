import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.classification.bag_vs_instance import (AggregateLoss, aggregate_ols, bag_loss, bag_means, bag_spread,
                                                     conditional_bias_variance, instance_loss, interpolating_loss,
                                                     interpolating_risk, make_bags)


def reference_losses(pred, bag_idx, bag_y, rho):
    """Loop-based float64 transcription of the paper's definitions, bag by bag."""
    pred, bag_idx, bag_y = pred.tolist(), bag_idx.tolist(), bag_y.tolist()
    bags = {}
    for i, a in enumerate(bag_idx):
        bags.setdefault(a, []).append(i)
    l_bag, l_ins, reg = [], [], []
    for a in range(len(bag_y)):
        members = bags.get(a, [])
        if not members:
            l_bag.append(bag_y[a] ** 2); l_ins.append(0.0); reg.append(0.0)
            continue
        fbar = sum(pred[i] for i in members) / len(members)
        l_bag.append((bag_y[a] - fbar) ** 2)
        l_ins.append(sum((bag_y[a] - pred[i]) ** 2 for i in members) / len(members))
        reg.append(sum((pred[i] - fbar) ** 2 for i in members) / len(members))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return mean(l_bag), mean(l_ins), mean(reg), mean([b + rho * r for b, r in zip(l_bag, reg)])


def _problem(n=60, k=4, seed=0, d=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + torch.randn(n, generator=gen, dtype=torch.float64)
    bags = make_bags(n, k, generator=gen)
    return x, y, bags, bag_means(y, bags)[0]


@pytest.mark.parametrize("n,k", [(60, 4), (61, 5), (10, 1), (12, 12)])
def test_losses_match_loop_reference(n, k):
    x, y, bags, yb = _problem(n, k)
    pred = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = reference_losses(pred, bags, yb, 0.3)
    got = (bag_loss(pred, bags, yb), instance_loss(pred, bags, yb), bag_spread(pred, bags),
           interpolating_loss(pred, bags, yb, 0.3))
    for g, r in zip(got, ref):
        assert abs(float(g) - r) < 1e-12


def test_instance_is_bag_plus_spread_and_the_endpoints():
    x, y, bags, yb = _problem(100, 5)
    pred = 3 * torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ins, bag, spread = instance_loss(pred, bags, yb), bag_loss(pred, bags, yb), bag_spread(pred, bags)
    torch.testing.assert_close(ins, bag + spread, rtol=0, atol=1e-12)
    torch.testing.assert_close(interpolating_loss(pred, bags, yb, 0.0), bag, rtol=0, atol=0)
    torch.testing.assert_close(interpolating_loss(pred, bags, yb, 1.0), ins, rtol=0, atol=1e-12)
    # per bag too, and the sum reduction
    torch.testing.assert_close(instance_loss(pred, bags, yb, reduction="none"),
                               bag_loss(pred, bags, yb, reduction="none") + bag_spread(pred, bags, reduction="none"))
    torch.testing.assert_close(bag_loss(pred, bags, yb, reduction="sum"), 20 * bag)


def test_bags_of_one_make_all_losses_the_ordinary_mse():
    x, y, bags, yb = _problem(30, 1)
    pred = torch.zeros(30, dtype=torch.float64)
    mse = ((y - pred) ** 2).mean()
    for rho in (0.0, 0.5, 1.0):
        torch.testing.assert_close(interpolating_loss(pred, bags, yb, rho), mse)
    assert float(bag_spread(pred + torch.randn(30, dtype=torch.float64), bags)) == 0.0
    # an explicit n_bags may add empty bags, which count as zero spread
    assert bag_spread(pred, bags, n_bags=32, reduction="none").shape == (32,)


def test_make_bags_is_a_random_partition():
    b = make_bags(103, 10, generator=torch.Generator().manual_seed(0))
    counts = b.bincount()
    assert b.dtype == torch.int64 and counts.tolist() == [10] * 10 + [3]
    assert not torch.equal(b, make_bags(103, 10, generator=torch.Generator().manual_seed(1)))


def test_bag_means_of_a_matrix():
    v = torch.arange(12.0).reshape(6, 2)
    means, counts = bag_means(v, torch.tensor([0, 1, 0, 1, 2, 0]))
    torch.testing.assert_close(means, torch.tensor([[(0 + 4 + 10) / 3, (1 + 5 + 11) / 3], [4.0, 5.0], [8.0, 9.0]]))
    torch.testing.assert_close(counts, torch.tensor([3.0, 2.0, 1.0]))


@pytest.mark.parametrize("rho", [0.0, 0.2, 1.0, 2.5])
def test_closed_form_is_the_minimiser(rho):
    x, y, bags, yb = _problem(80, 4, d=5)
    theta = aggregate_ols(x, bags, yb, rho).requires_grad_()
    (grad,) = torch.autograd.grad(interpolating_loss(x @ theta, bags, yb, rho), theta)
    assert grad.abs().max() < 1e-10
    # at rho = 1 it is least squares of the broadcast bag means on the instances
    if rho == 1.0:
        ls = torch.linalg.lstsq(x, yb[bags][:, None]).solution[:, 0]
        torch.testing.assert_close(theta.detach(), ls)


def test_closed_form_min_norm_when_underdetermined():
    x, y, bags, yb = _problem(20, 5, d=8)     # 4 bags, 8 features: rho = 0 is singular
    theta = aggregate_ols(x, bags, yb, 0.0)
    assert torch.isfinite(theta).all()
    xbar = bag_means(x, bags)[0]
    torch.testing.assert_close(xbar @ theta, yb)          # interpolates the bags
    torch.testing.assert_close(theta, torch.linalg.pinv(xbar) @ yb)


def test_gradcheck():
    x, y, bags, yb = _problem(24, 4)
    pred = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: interpolating_loss(p, bags, yb, 0.7), (pred,))
    assert torch.autograd.gradcheck(lambda p: instance_loss(p, bags, yb), (pred,))


def test_conditional_bias_variance_matches_monte_carlo():
    gen = torch.Generator().manual_seed(3)
    n, d, k, reps = 200, 10, 4, 400
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    theta = torch.randn(d, generator=gen, dtype=torch.float64)
    bags = make_bags(n, k, generator=gen)
    for rho in (0.0, 0.5, 1.0):
        bias2, var = conditional_bias_variance(x, bags, theta, rho, noise_var=0.5)
        # the mean of the estimator given X is the estimator on noiseless responses
        clean = aggregate_ols(x, bags, bag_means(x @ theta, bags)[0], rho)
        torch.testing.assert_close(((clean - theta) ** 2).sum(), bias2)
        ys = x @ theta + 0.5 ** 0.5 * torch.randn(reps, n, generator=gen, dtype=torch.float64)
        est = torch.stack([aggregate_ols(x, bags, bag_means(yy, bags)[0], rho) for yy in ys])
        emp_var = ((est - clean) ** 2).sum(1).mean()
        assert abs(float(emp_var / var) - 1) < 0.15
        assert ((est.mean(0) - clean) ** 2).sum() < 5 * var / reps
    # the bag-level estimator is unbiased given the features
    assert conditional_bias_variance(x, bags, theta, 0.0)[0] < 1e-20


def test_theory_special_cases():
    # rho = 0: ordinary least squares on m = n/k samples, risk sigma^2 / (psi/k - 1)
    r = interpolating_risk(20.0, 5, 0.0, signal=2.0, noise=0.7)
    assert abs(float(r["risk"]) - 0.7 / 3) < 1e-10 and float(r["bias2"]) < 1e-14
    # rho = 1: shrinkage to theta/k, variance sigma^2 (1/k) / (psi - 1)
    r = interpolating_risk(20.0, 5, 1.0, signal=2.0, noise=0.7)
    assert abs(float(r["shrinkage"]) - 0.2) < 1e-10
    assert abs(float(r["variance"]) - 0.7 / 5 / 19) < 1e-10
    # k = 1: every rho is ordinary least squares
    r = interpolating_risk(4.0, 1, torch.tensor([0.0, 0.3, 1.0]), noise=1.0)
    torch.testing.assert_close(r["risk"], torch.full((3,), 1 / 3, dtype=torch.float64))
    # no limit when there are fewer bags than features at rho = 0
    assert math.isinf(float(interpolating_risk(4.0, 5, 0.0)["risk"]))


def test_theory_matches_simulation():
    n, d, k, rhos = 1000, 50, 5, [0.0, 0.1, 1.0]
    gen = torch.Generator().manual_seed(4)
    risks = []
    for _ in range(30):
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        theta = torch.randn(d, generator=gen, dtype=torch.float64)
        theta /= theta.norm()
        y = x @ theta + torch.randn(n, generator=gen, dtype=torch.float64)
        bags = make_bags(n, k, generator=gen)
        yb = bag_means(y, bags)[0]
        risks.append([float(((aggregate_ols(x, bags, yb, r) - theta) ** 2).sum()) for r in rhos])
    risks = np.array(risks)
    theory = interpolating_risk(n / d, k, torch.tensor(rhos))["risk"].numpy()
    se = risks.std(0, ddof=1) / np.sqrt(len(risks))
    assert np.all(np.abs(risks.mean(0) - theory) < 3 * se + 0.05 * theory), (risks.mean(0), theory)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 8), rho=st.floats(0, 3), seed=st.integers(0, 2**31 - 1),
       shift=st.floats(-100, 100))
def test_property_identity_and_shift_invariance(n, k, rho, seed, shift):
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    bags = make_bags(n, k, generator=gen)
    pred = torch.randn(n, generator=gen, dtype=torch.float64)
    yb = torch.randn(int(bags.max()) + 1, generator=gen, dtype=torch.float64)
    ins, bag, spread = instance_loss(pred, bags, yb), bag_loss(pred, bags, yb), bag_spread(pred, bags)
    assert bag >= 0 and spread >= 0 and abs(float(ins - bag - spread)) < 1e-9 * (1 + float(ins))
    lo, mid, hi = (interpolating_loss(pred, bags, yb, r) for r in (0.0, rho, max(rho, 1.0)))
    assert lo <= mid + 1e-12 and mid <= hi + 1e-12                        # monotone in rho
    # the spread ignores a constant shift of the predictions; bag loss is invariant to a joint shift
    torch.testing.assert_close(bag_spread(pred + shift, bags), spread, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bag_loss(pred + shift, bags, yb + shift), bag, rtol=1e-9, atol=1e-9)
    # permuting the points (with their bag numbers) changes nothing
    perm = torch.randperm(n, generator=gen)
    torch.testing.assert_close(interpolating_loss(pred[perm], bags[perm], yb, rho), mid)


def test_float32_and_module():
    x, y, bags, yb = _problem(40, 4)
    pred = torch.randn(40, 1)
    out = AggregateLoss(rho=0.5)(pred, bags, yb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, interpolating_loss(pred.double(), bags, yb, 0.5).float())
    assert "rho=0.5" in repr(AggregateLoss(0.5))


def test_bad_input_names_the_argument():
    bags, yb = torch.tensor([0, 0, 1, 1]), torch.zeros(2)
    with pytest.raises(ValueError, match="pred"):
        bag_loss(torch.zeros(4, 2), bags, yb)
    with pytest.raises(ValueError, match="pred"):
        bag_loss(torch.zeros(4, dtype=torch.int64), bags, yb)
    with pytest.raises(ValueError, match="bag_idx"):
        bag_loss(torch.zeros(4), bags.float(), yb)
    with pytest.raises(ValueError, match="bag_idx"):
        bag_loss(torch.zeros(3), bags, yb)
    with pytest.raises(ValueError, match="bag_idx"):
        bag_loss(torch.zeros(4), torch.tensor([0, -1, 1, 1]), yb)
    with pytest.raises(ValueError, match="bag_y has only"):
        bag_loss(torch.zeros(4), torch.tensor([0, 0, 1, 2]), yb)
    with pytest.raises(ValueError, match="bag_y"):
        bag_loss(torch.zeros(4), bags, torch.zeros(2, 2))
    for bad in (-0.1, math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="rho"):
            interpolating_loss(torch.zeros(4), bags, yb, bad)
    with pytest.raises(ValueError, match="rho"):
        AggregateLoss(rho=-1)
    with pytest.raises(ValueError, match="reduction"):
        bag_loss(torch.zeros(4), bags, yb, reduction="avg")
    with pytest.raises(ValueError, match="k must"):
        make_bags(10, 0)
    with pytest.raises(ValueError, match="k must"):
        make_bags(10, 11)
    with pytest.raises(ValueError, match="n must"):
        make_bags(0, 1)
    with pytest.raises(ValueError, match="x must"):
        aggregate_ols(torch.zeros(4), bags, yb, 0.5)
    with pytest.raises(ValueError, match="ridge"):
        aggregate_ols(torch.zeros(4, 2), bags, yb, 0.5, ridge=-1.0)
    with pytest.raises(ValueError, match="theta"):
        conditional_bias_variance(torch.zeros(4, 2), bags, torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="n_over_d"):
        interpolating_risk(0.0, 2, 0.5)
    with pytest.raises(ValueError, match="k must"):
        interpolating_risk(2.0, 0, 0.5)
    with pytest.raises(ValueError, match="rho"):
        interpolating_risk(2.0, 2, -0.5)


def test_tiny_training_learns():
    """A linear model trained by Adam on the interpolating loss reaches the closed form."""
    x, y, bags, yb = _problem(200, 4, d=3)
    model = torch.nn.Linear(3, 1, bias=False).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss_fn = AggregateLoss(rho=0.3)
    first = float(loss_fn(model(x), bags, yb).detach())
    for _ in range(250):
        loss = loss_fn(model(x), bags, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(model.weight.detach()[0], aggregate_ols(x, bags, yb, 0.3), rtol=1e-3, atol=1e-3)
    assert float(loss.detach()) < first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, y, bags, yb = _problem(500, 5, d=7)
    pred = torch.randn(500, dtype=torch.float64)
    for rho in (0.0, 0.4, 1.0):
        torch.testing.assert_close(interpolating_loss(pred.cuda(), bags.cuda(), yb.cuda(), rho).cpu(),
                                   interpolating_loss(pred, bags, yb, rho))
        torch.testing.assert_close(aggregate_ols(x.cuda(), bags.cuda(), yb.cuda(), rho).cpu(),
                                   aggregate_ols(x, bags, yb, rho))
    b = make_bags(100, 10, generator=torch.Generator("cuda").manual_seed(0))
    assert b.device.type == "cuda" and b.bincount().tolist() == [10] * 10
    # a training step on the GPU waits on the host only through what the caller passes (n_bags = len(bag_y))
    p = pred.cuda().requires_grad_()
    bc, ybc = bags.cuda(), yb.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        interpolating_loss(p, bc, ybc, 0.5).backward()
        bag_spread(p, bc, n_bags=len(ybc))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(p.grad).all()


def test_batched_rho_matches_one_at_a_time():
    x, y, bags, yb = _problem(90, 3, d=4)
    rhos = torch.tensor([0.0, 0.25, 1.0, 3.0], dtype=torch.float64)
    batch = aggregate_ols(x, bags, yb, rhos)
    assert batch.shape == (4, 4)
    for r, t in zip(rhos.tolist(), batch):
        torch.testing.assert_close(t, aggregate_ols(x, bags, yb, r))
    with pytest.raises(ValueError, match="rho"):
        aggregate_ols(x, bags, yb, torch.tensor([0.5, -1.0], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(psi=st.floats(1.5, 60), k=st.integers(2, 12), snr=st.floats(0.05, 20))
def test_property_theory_trade_off(psi, k, snr):
    """Variance falls and shrinkage runs from 1 to 1/k as rho goes from 0 to 1."""
    rhos = torch.linspace(0, 1, 41, dtype=torch.float64)
    r = interpolating_risk(psi, k, rhos, signal=snr, noise=1.0)
    inner = r["variance"][1:]
    assert bool((inner[1:] <= inner[:-1] * (1 + 1e-9)).all())
    a = r["shrinkage"][1:]
    assert bool((a[1:] <= a[:-1] + 1e-12).all()) and abs(float(a[-1]) - 1 / k) < 1e-9
    assert bool((r["bias2"][1:] >= 0).all())
    if psi / k > 1:       # the bag-level end exists: unbiased, least-squares variance
        assert float(r["bias2"][0]) < 1e-12 and float(r["variance"][0]) == pytest.approx(1 / (psi / k - 1), rel=1e-9)  # huge near psi/k = 1
        assert bool((r["variance"][1:] <= r["variance"][0] * (1 + 1e-9)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    bags = make_bags(64, 4, generator=torch.Generator().manual_seed(0))
    pred = torch.randn(64).to(dtype).requires_grad_()
    yb = torch.randn(16).to(dtype)
    loss = interpolating_loss(pred, bags, yb, 0.5)
    (grad,) = torch.autograd.grad(loss, pred)
    assert loss.dtype == dtype and torch.isfinite(loss) and bool(torch.isfinite(grad).all())
    ref = interpolating_loss(pred.detach().double(), bags, yb.double(), 0.5)
    assert abs(float(loss.detach()) - float(ref)) < 0.05 * float(ref) + 1e-2
