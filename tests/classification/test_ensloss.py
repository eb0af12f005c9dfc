import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.classification.ensloss import (EnsLoss, ensloss, is_calibrated_derivative, margin_loss, margins,
                                             sample_calibrated_derivatives)

KINDS = ["logistic", "hinge", "squared_hinge", "exponential"]


def reference(s, z, lam):
    """Loop-based float64 transcription of the sampler given the normal draws z: negate the inverse
    Box-Cox of each draw, sort, clip at -1, hand out by rank of the margin, divide the tail by s,
    subtract 1e-6."""
    s, z = s.tolist(), z.tolist()

    def bc_inv(v):
        if lam == 0:
            return math.exp(v)
        base = max(1 + lam * v, 0.0)
        return math.inf if (base == 0 and lam < 0) else base ** (1 / lam)

    g = sorted(-bc_inv(v) for v in z)
    g = [max(v, -1.0) for v in g]
    order = sorted(range(len(s)), key=lambda i: s[i])
    out = [0.0] * len(s)
    for rank, i in enumerate(order):
        out[i] = g[rank]
    out = [v / s[i] if s[i] > 1 else v for i, v in enumerate(out)]
    return torch.tensor([v - 1e-6 for v in out], dtype=torch.float64)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0, -0.5])
def test_sampler_matches_loop_reference(lam):
    gen = torch.Generator().manual_seed(0)
    s = 2 * torch.randn(60, generator=gen, dtype=torch.float64)   # distinct margins, some > 1
    z = torch.randn(60, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sample_calibrated_derivatives(s, boxcox_lambda=lam, z=z), reference(s, z, lam),
                               rtol=1e-12, atol=1e-12)


def test_rows_are_independent_batches():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(7, 13, generator=gen, dtype=torch.float64) * 3
    z = torch.randn(7, 13, generator=gen, dtype=torch.float64)
    whole = sample_calibrated_derivatives(s, z=z)
    for r in range(7):
        torch.testing.assert_close(whole[r], sample_calibrated_derivatives(s[r], z=z[r]), rtol=0, atol=0)


@pytest.mark.parametrize("lam", [0.0, 0.5, -0.5])
def test_convex_and_calibrated_on_many_batches(lam):
    gen = torch.Generator().manual_seed(2)
    s = 3 * torch.randn(5000, 64, generator=gen)           # 5000 batches of 64 margins, one call
    g = sample_calibrated_derivatives(s, boxcox_lambda=lam, generator=gen)
    ok = is_calibrated_derivative(s, g)
    assert ok.shape == (5000,) and bool(ok.all())
    assert bool((g >= -1 - 2e-6).all()) and bool((g <= -1e-6 + 1e-9).all())
    # the checker is not vacuous: the same values shuffled within each row are rejected nearly always
    shuffled = g.gather(1, torch.rand(s.shape, generator=gen).argsort(1))
    assert is_calibrated_derivative(s, shuffled).float().mean() < 0.01


def test_expected_derivative_is_convex_and_calibrated():
    """The average over draws at fixed margins (the ensemble's derivative) is itself non-decreasing and < 0."""
    gen = torch.Generator().manual_seed(3)
    s = torch.linspace(-4, 4, 32, dtype=torch.float64).expand(20000, 32)
    mean_g = sample_calibrated_derivatives(s, generator=gen).mean(0)
    assert bool(is_calibrated_derivative(s[0], mean_g))
    assert mean_g[0] < -0.9 and mean_g[-1] > -0.1     # strongly negative on the left, faded in the tail


def test_checker():
    s = torch.tensor([0.0, 1.0, 2.0])
    assert not is_calibrated_derivative(s, torch.tensor([-0.1, -0.5, -0.01]))   # decreasing somewhere
    assert not is_calibrated_derivative(s, torch.tensor([-0.5, -0.1, 0.0]))     # not negative
    assert is_calibrated_derivative(s, torch.tensor([-0.5, -0.1, -0.01]))
    # tied margins may carry different values (a subgradient at a kink), in either order
    assert is_calibrated_derivative(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([-0.2, -0.5, -0.1]))
    assert not is_calibrated_derivative(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([-0.2, -0.5, -0.3]))


margin_lists = st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=48)


@settings(max_examples=60, deadline=None)
@given(values=margin_lists, lam=st.floats(-2.0, 3.0), seed=st.integers(0, 2**31 - 1))
def test_property_cc_and_finite_for_any_margins(values, lam, seed):
    s = torch.tensor(values, dtype=torch.float32)          # ties and huge margins allowed
    g = sample_calibrated_derivatives(s, boxcox_lambda=lam, generator=torch.Generator().manual_seed(seed))
    assert g.shape == s.shape and g.dtype == s.dtype
    assert bool(torch.isfinite(g).all())
    assert bool(is_calibrated_derivative(s, g))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 2**31 - 1), shift=st.floats(0.0, 50.0))
def test_property_depends_on_ranks_only_below_one(n, seed, shift):
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 3        # margins in [-3, 1)
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    g = sample_calibrated_derivatives(s, z=z)
    # permuting the batch permutes the answer; an increasing map of margins that stay below 1 changes nothing
    torch.testing.assert_close(sample_calibrated_derivatives(s[perm], z=z), g[perm], rtol=0, atol=0)
    torch.testing.assert_close(sample_calibrated_derivatives(s - shift, z=z), g, rtol=0, atol=0)


def test_generator_reproducible():
    s = torch.randn(100)
    a = sample_calibrated_derivatives(s, generator=torch.Generator().manual_seed(5))
    b = sample_calibrated_derivatives(s, generator=torch.Generator().manual_seed(5))
    c = sample_calibrated_derivatives(s, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("reduction,scale", [("mean", 1 / 16), ("sum", 1.0)])
def test_surrogate_gradient_is_g_times_y(reduction, scale):
    f = torch.randn(16, 1, dtype=torch.float64, requires_grad=True)
    t = (torch.arange(16) % 2).double()
    out = ensloss(f, t, generator=torch.Generator().manual_seed(3), reduction=reduction)
    out.backward()
    s = margins(f.detach(), t)
    g = sample_calibrated_derivatives(s, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(f.grad.squeeze(1), scale * g * (2 * t - 1))   # d s_i / d f_i = y_i
    torch.testing.assert_close(out.detach(), scale * (g * s).sum())              # the surrogate's value


def test_module_matches_function_and_reductions():
    f, t = torch.randn(8, 1), torch.randint(0, 2, (8,))
    a = EnsLoss(generator=torch.Generator().manual_seed(0), reduction="sum")(f, t)
    b = ensloss(f, t, generator=torch.Generator().manual_seed(0), reduction="sum")
    assert torch.equal(a, b)
    assert ensloss(f, t, reduction="none").shape == (8,)
    assert "boxcox_lambda=0.0" in repr(EnsLoss())


def test_margin_losses_match_their_definitions():
    gen = torch.Generator().manual_seed(4)
    f = 3 * torch.randn(64, dtype=torch.float64, generator=gen)
    t = torch.randint(0, 2, (64,), generator=gen).double()
    s = f * (2 * t - 1)
    torch.testing.assert_close(margin_loss(f, t, "logistic"), F.binary_cross_entropy_with_logits(f, t))
    torch.testing.assert_close(margin_loss(f, t, "hinge", reduction="none"), torch.relu(1 - s))
    torch.testing.assert_close(margin_loss(f, t, "squared_hinge", reduction="none"), torch.relu(1 - s) ** 2)
    torch.testing.assert_close(margin_loss(f, t, "exponential", reduction="sum"), torch.exp(-s).sum())


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_losses_are_convex_and_calibrated(kind):
    """Their derivatives, taken by autograd on a grid of margins, pass the same CC check."""
    grid = torch.linspace(-5, 5, 101, dtype=torch.float64).requires_grad_()   # 0 is a grid point
    (d,) = torch.autograd.grad(margin_loss(grid, torch.ones(101), kind, reduction="sum"), grid)
    assert bool(is_calibrated_derivative(grid.detach()[grid.detach() <= 0], d[grid.detach() <= 0]))
    assert bool((d[1:] >= d[:-1]).all()) and d[50] < 0


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    f = torch.tensor([-2.3, -0.4, 0.3, 0.7, 1.9, 2.6], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 1, 0, 1, 0.0], dtype=torch.float64)   # no margin at the hinge's kink s = 1
    assert torch.autograd.gradcheck(lambda x: margin_loss(x, t, kind), (f,))


@pytest.mark.parametrize("name", ["ensloss", *KINDS])
def test_extreme_scores_stay_finite_in_float32(name):
    f = (1e4 * torch.randn(64, generator=torch.Generator().manual_seed(7))).requires_grad_()
    t = torch.randint(0, 2, (64,))
    loss = ensloss(f, t) if name == "ensloss" else margin_loss(f, t, name)
    (grad,) = torch.autograd.grad(loss, f)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    f = torch.randn(32, dtype=dtype).mul(20).requires_grad_()
    t = torch.randint(0, 2, (32,))
    s = margins(f.detach(), t)
    g = sample_calibrated_derivatives(s)
    assert g.dtype == dtype and bool(is_calibrated_derivative(s.float(), g.float()))
    (grad,) = torch.autograd.grad(ensloss(f, t), f)
    assert bool(torch.isfinite(grad).all())
    assert bool(torch.isfinite(margin_loss(f, t, "exponential")))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="logits"):
        ensloss(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="logits"):
        ensloss(torch.zeros(4, dtype=torch.int64), torch.zeros(4))
    with pytest.raises(ValueError, match="target"):
        ensloss(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="target.*binary"):
        ensloss(torch.zeros(3), torch.tensor([-1, 1, 1]))
    with pytest.raises(ValueError, match="kind"):
        margin_loss(torch.zeros(2), torch.zeros(2), "savage")
    with pytest.raises(ValueError, match="reduction"):
        margin_loss(torch.zeros(2), torch.zeros(2), reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        ensloss(torch.zeros(2), torch.zeros(2), reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        EnsLoss(reduction="avg")
    for bad in (math.nan, math.inf, "0", True):
        with pytest.raises(ValueError, match="boxcox_lambda"):
            sample_calibrated_derivatives(torch.zeros(3), boxcox_lambda=bad)
    with pytest.raises(ValueError, match="boxcox_lambda"):
        EnsLoss(boxcox_lambda=math.nan)
    with pytest.raises(ValueError, match="z must"):
        sample_calibrated_derivatives(torch.zeros(3), z=torch.zeros(4))
    with pytest.raises(ValueError, match="s must"):
        sample_calibrated_derivatives(torch.tensor(1.0))
    with pytest.raises(ValueError, match="s and g"):
        is_calibrated_derivative(torch.zeros(3), torch.zeros(4))


def test_tiny_training_learns():
    torch.manual_seed(0)
    x = torch.randn(256, 2)
    t = (x[:, 0] - 0.5 * x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loss_fn = EnsLoss(generator=torch.Generator().manual_seed(0))
    before = ((model(x).squeeze(1) > 0).long() == t).float().mean()
    for _ in range(150):
        idx = torch.randint(0, 256, (32,))
        loss = loss_fn(model(x[idx]), t[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ((model(x).squeeze(1) > 0).long() == t).float().mean()
    assert after > 0.95 and after > before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(8)
    s = 2 * torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    z = torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    got = sample_calibrated_derivatives(s.cuda(), z=z.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), sample_calibrated_derivatives(s, z=z))
    assert bool(is_calibrated_derivative(s.cuda(), got).all())
    # the same draws on both devices give the same gradient
    f = torch.randn(64, 1, generator=gen)
    t = torch.randint(0, 2, (64,), generator=gen)
    z64 = torch.randn(64, generator=gen)
    grads = []
    for dev in ("cpu", "cuda"):
        fd = f.to(dev, copy=True).requires_grad_()                            # a fresh leaf per device
        sd = margins(fd, t.to(dev))
        (sample_calibrated_derivatives(sd, z=z64) * sd).mean().backward()   # z is moved to the device
        grads.append(fd.grad.cpu())
    torch.testing.assert_close(grads[0], grads[1])
    for kind in KINDS:
        torch.testing.assert_close(margin_loss(f.cuda(), t.cuda(), kind).cpu(), margin_loss(f, t, kind))
    # with a CUDA generator, a training step never waits on the host
    fc, tc = f.to("cuda", copy=True).requires_grad_(), t.cuda()
    cuda_gen = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ensloss(fc, tc, generator=cuda_gen).backward()
        margin_loss(fc, tc, "exponential").backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fc.grad.device.type == "cuda" and bool(torch.isfinite(fc.grad).all())
