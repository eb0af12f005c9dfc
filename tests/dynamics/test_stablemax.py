import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.dynamics.stablemax import (OrthoGrad, StableMaxCrossEntropy, StackedMLP, absorption_gap,
                                         homogeneous_mlp, log_stablemax, modular_arithmetic, nlm_cosine,
                                         orthogonal_gradient, orthogonalize_gradients_, softmax_collapse,
                                         softmax_collapse_fraction, stablemax, stablemax_cross_entropy,
                                         stablemax_s)


# ---------------------------------------------------------------- loop references (float64)

def ref_s(v):
    return v + 1 if v >= 0 else 1 / (1 - v)


def ref_stablemax_ce(z, y):
    """-log(s(z_y) / sum_j s(z_j)) for each row, written as plain loops."""
    out = []
    for row, t in zip(z.tolist(), y.tolist()):
        total = sum(ref_s(v) for v in row)
        out.append(-math.log(ref_s(row[t]) / total))
    return torch.tensor(out, dtype=torch.float64)


def ref_orthogonal(g, w, rescale):
    g, w = g.flatten().tolist(), w.flatten().tolist()
    dot = sum(a * b for a, b in zip(w, g))
    ww = sum(a * a for a in w)
    gp = [gi - dot / ww * wi for gi, wi in zip(g, w)]
    if rescale:
        n_g = math.sqrt(sum(a * a for a in g))
        n_p = math.sqrt(sum(a * a for a in gp))
        gp = [a * n_g / n_p for a in gp]
    return torch.tensor(gp, dtype=torch.float64)


# ---------------------------------------------------------------- StableMax

def test_stablemax_ce_matches_loop_reference():
    gen = torch.Generator().manual_seed(0)
    z = 5 * torch.randn(40, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 7, (40,), generator=gen)
    torch.testing.assert_close(stablemax_cross_entropy(z, y, reduction="none"), ref_stablemax_ce(z, y),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stablemax_cross_entropy(z, y), ref_stablemax_ce(z, y).mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stablemax_cross_entropy(z, y, reduction="sum"), ref_stablemax_ce(z, y).sum(),
                               rtol=1e-12, atol=1e-12)


def test_s_special_values_and_smoothness():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 1e6], dtype=torch.float64)
    torch.testing.assert_close(stablemax_s(x), torch.tensor([0.25, 0.5, 1.0, 2.0, 1e6 + 1], dtype=torch.float64))
    # C^1 at 0 with s(0) = s'(0) = 1, like exp
    h = torch.tensor([-1e-6, 1e-6], dtype=torch.float64, requires_grad=True)
    stablemax_s(h).sum().backward()
    torch.testing.assert_close(h.grad, torch.ones(2, dtype=torch.float64), rtol=1e-5, atol=0)


def test_log_stablemax_is_log_of_stablemax_and_sums_to_one():
    z = 4 * torch.randn(30, 11, dtype=torch.float64)
    p = stablemax(z)
    torch.testing.assert_close(p.sum(-1), torch.ones(30, dtype=torch.float64))
    torch.testing.assert_close(log_stablemax(z), p.log())
    torch.testing.assert_close(stablemax(z.T, dim=0), p.T)


def test_compute_dtype_and_module():
    z = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    a = stablemax_cross_entropy(z, y)
    assert a.dtype == torch.float32
    b = stablemax_cross_entropy(z, y, compute_dtype=None)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(StableMaxCrossEntropy()(z, y), a)
    # batched leading dimensions (several models at once)
    zz, yy = torch.randn(3, 8, 5), torch.randint(0, 5, (3, 8))
    torch.testing.assert_close(stablemax_cross_entropy(zz, yy, reduction="none")[1],
                               stablemax_cross_entropy(zz[1], yy[1], reduction="none"))


def test_derivative_at_the_junction_is_one():
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (log_stablemax(torch.cat([x, torch.tensor([-2.0], dtype=torch.float64)]))[0]).backward()
    # d/dx [log s(x) - log(s(x) + s(-2))] at 0 = 1 - 1 / (1 + 1/3)
    torch.testing.assert_close(x.grad, torch.tensor([0.25], dtype=torch.float64))


logit_rows = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=20)


@settings(max_examples=60, deadline=None)
@given(row=logit_rows, i=st.integers(0, 19), bump=st.floats(1e-3, 10.0))
def test_property_stablemax_is_a_monotone_distribution_and_never_collapses(row, i, bump):
    z = torch.tensor(row, dtype=torch.float64)
    i = i % len(row)
    p = stablemax(z)
    assert bool((p > 0).all()) and abs(float(p.sum()) - 1) < 1e-12
    z2 = z.clone()
    z2[i] += bump
    assert float(stablemax(z2)[i]) >= float(p[i])                     # raising a logit raises its probability
    # float32 logits within +-1e3: the loss is finite and strictly positive (no absorption), as a float32 result;
    # (StableMax does collapse in float32 too, but only once sum_{k != y} s(z_k) / s(z_y) <= 2^-24, e.g. logits ~ 1e4-1e8)
    loss = stablemax_cross_entropy(z.float()[None], torch.tensor([i]), compute_dtype=None)
    assert bool(torch.isfinite(loss)) and float(loss) > 0


def test_gradcheck_stablemax_ce():
    z = (3 * torch.randn(6, 5, dtype=torch.float64)).requires_grad_(True)
    z.data[0, 0] = 0.0  # the junction of the two branches
    y = torch.randint(0, 5, (6,))
    assert torch.autograd.gradcheck(lambda t: stablemax_cross_entropy(t, y, reduction="none"), (z,))


# ---------------------------------------------------------------- Softmax Collapse

@pytest.mark.parametrize("k", [2, 3, 23, 113])
def test_absorption_bounds_bracket_the_collapse(k):
    lo, hi = absorption_gap(2), absorption_gap(k)
    gaps = torch.tensor([lo - 0.05, hi + 0.05, 120.0])
    z = torch.zeros(3, k)
    z[:, 0] = gaps
    y = torch.zeros(3, dtype=torch.long)
    collapsed = softmax_collapse(z, y)
    assert collapsed.tolist() == [False, True, True]
    # the same logits in float64 are far from collapse
    assert not softmax_collapse(z[:2].double(), y[:2], dtype=None).any()


def test_collapse_means_zero_loss_and_zero_gradient_but_stablemax_still_learns():
    z = torch.zeros(1, 23)
    z[0, 0] = 120.0
    z.requires_grad_(True)
    F.cross_entropy(z, torch.tensor([0])).backward()
    assert float(z.grad.abs().max()) == 0.0              # every gradient entry absorbed or underflowed
    z2 = z.detach().clone().requires_grad_(True)
    loss = stablemax_cross_entropy(z2, torch.tensor([0]))
    loss.backward()
    assert float(loss.detach()) > 0.1 and float(z2.grad[0, 0]) < 0 and bool((z2.grad[0, 1:] > 0).all())
    assert softmax_collapse_fraction(z, torch.tensor([0])) == 1.0


def test_stablemax_collapses_only_at_astronomical_gaps():
    z = torch.zeros(1, 23)
    z[0, 0] = 1e4
    assert float(stablemax_cross_entropy(z, torch.tensor([0]), compute_dtype=None)) > 0
    z[0, 1:] = -1e5                                       # ratio 22 / (1e4 * 1e5) ~ 2e-8 < 2^-24: absorbed
    assert float(stablemax_cross_entropy(z, torch.tensor([0]), compute_dtype=None)) == 0
    assert float(stablemax_cross_entropy(z, torch.tensor([0]))) > 0   # not in float64


def test_collapse_needs_the_correct_class_on_top():
    z = torch.zeros(2, 4)
    z[:, 1] = 200.0
    assert softmax_collapse(z, torch.tensor([1, 0])).tolist() == [True, False]


# ---------------------------------------------------------------- ⊥Grad

@pytest.mark.parametrize("rescale", [False, True])
def test_orthogonal_gradient_matches_loop_reference(rescale):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    out = orthogonal_gradient(g, w, rescale=rescale)
    torch.testing.assert_close(out.flatten(), ref_orthogonal(g, w, rescale), rtol=1e-10, atol=1e-12)
    assert abs(float((out * w).sum())) < 1e-10


def test_orthogonal_gradient_batch_dims_is_per_model():
    g, w = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    out = orthogonal_gradient(g, w, batch_dims=1)
    for i in range(3):
        torch.testing.assert_close(out[i], orthogonal_gradient(g[i], w[i]))


def test_orthogonal_gradient_special_cases():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(orthogonal_gradient(g, torch.zeros(10, dtype=torch.float64)), g)  # zero weight
    w = torch.randn(10, generator=gen, dtype=torch.float64)
    assert float(orthogonal_gradient(3 * w, w, rescale=False).abs().max()) < 1e-12          # radial gradient
    # rescaling a radial gradient: either exactly 0 or round-off blown up to |g| (documented; the authors'
    # code does the same) -- finite and never larger than |g|
    out = orthogonal_gradient(3 * w, w, rescale=True)
    assert bool(torch.isfinite(out).all()) and float(out.norm()) <= 3 * float(w.norm()) * (1 + 1e-9)


def test_orthogonal_gradient_half_precision():
    g, w = torch.randn(64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)
    out = orthogonal_gradient(g, w)
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), orthogonal_gradient(g.float(), w.float()), rtol=2e-3, atol=2e-3)
    assert torch.equal(orthogonal_gradient(g, torch.zeros_like(w)), g)


def test_gradcheck_orthogonal_gradient():
    g = torch.randn(7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: orthogonal_gradient(a, b), (g, w))


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 2**31 - 1), c=st.floats(0.01, 100.0))
def test_property_orthogonal_and_norm_preserving(n, seed, c):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    out = orthogonal_gradient(g, w)
    assert abs(float(out @ w)) <= 1e-9 * float(g.norm() * w.norm())
    torch.testing.assert_close(out.norm(), g.norm(), rtol=1e-9, atol=1e-12)
    # invariant to rescaling the weights; equivariant to rescaling the gradient
    torch.testing.assert_close(orthogonal_gradient(g, c * w), out, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(orthogonal_gradient(c * g, w), c * out, rtol=1e-9, atol=1e-12)


def test_orthograd_sgd_step_equals_projected_step_and_keeps_norm_to_second_order():
    torch.manual_seed(0)
    w0 = torch.randn(6, 4, dtype=torch.float64)
    g = torch.randn(6, 4, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = OrthoGrad([p], torch.optim.SGD, lr=1e-3, rescale=False)
    p.grad = g.clone()
    opt.step()
    gp = orthogonal_gradient(g, w0, rescale=False)
    torch.testing.assert_close(p.detach(), w0 - 1e-3 * gp)
    # |w - lr g_perp|^2 = |w|^2 + lr^2 |g_perp|^2
    torch.testing.assert_close(p.detach().norm() ** 2, w0.norm() ** 2 + 1e-6 * gp.norm() ** 2)


def test_orthograd_wraps_adamw_state_dict_and_param_groups():
    model = torch.nn.Linear(3, 2, bias=False)
    opt = OrthoGrad(model.parameters(), torch.optim.AdamW, lr=0.1, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["eps"] == 1e-25 and opt.param_groups[0]["rescale"] is True
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
    sd = opt.state_dict()
    model2 = torch.nn.Linear(3, 2, bias=False)
    opt2 = OrthoGrad(model2.parameters(), torch.optim.AdamW, lr=1.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["eps"] == 1e-25
    assert opt2.base_optimizer.param_groups[0]["lr"] == 0.1          # the base optimizer sees it too
    assert opt2.state[model2.weight]["step"] == 3
    sched = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
    opt2.zero_grad(); model2(torch.randn(5, 3)).sum().backward(); opt2.step(); sched.step()
    assert opt2.base_optimizer.param_groups[0]["lr"] == 0.05


def test_orthogonalize_gradients_in_place_skips_missing():
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(5))
    a.grad = torch.randn(5)
    expected = orthogonal_gradient(a.grad, a.detach())
    orthogonalize_gradients_([a, b])
    torch.testing.assert_close(a.grad, expected)
    assert b.grad is None


def test_nlm_cosine_is_one_for_pure_scaling_direction():
    """For a bias-free ReLU MLP with every training point correct, the gradient of CE is mostly
    radial; for a gradient set exactly to -theta the cosine is 1."""
    m = homogeneous_mlp(4, (8,), 3)
    for p in m.parameters():
        p.grad = -2.0 * p.detach()
    assert abs(float(nlm_cosine(m.parameters())) - 1) < 1e-6
    x = torch.randn(10, 4)
    torch.testing.assert_close(homogeneous_mlp_scaled(m, x, 2.0), 4.0 * m(x))   # two layers: c^2


def homogeneous_mlp_scaled(m, x, c):
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(c)
        out = m(x)
        for p in m.parameters():
            p.div_(c)
    return out


def test_stacked_mlp_models_are_independent():
    m = StackedMLP(3, 6, (5,), 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 6)
    out = m(x)
    assert out.shape == (3, 7, 4)
    w1, w2 = m.weights[0][1], m.weights[1][1]
    torch.testing.assert_close(out[1], torch.relu(x @ w1) @ w2)
    out[0].sum().backward()
    assert float(m.weights[0].grad[1:].abs().max()) == 0.0


def test_modular_arithmetic():
    d = modular_arithmetic(7, op="add", train_frac=0.5, seed=0)
    assert d.x_train.shape == (24, 14) and d.x_test.shape == (25, 14) and d.n_classes == 7
    a, b = d.x_train[:, :7].argmax(1), d.x_train[:, 7:].argmax(1)
    assert torch.equal(d.y_train, (a + b) % 7)
    dm = modular_arithmetic(7, op="mul", train_frac=0.5, seed=0)
    a, b = dm.x_test[:, :7].argmax(1), dm.x_test[:, 7:].argmax(1)
    assert torch.equal(dm.y_test, (a * b) % 7)


# ---------------------------------------------------------------- bad input

def test_bad_input():
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="reduction"):
        stablemax_cross_entropy(z, y, reduction="avg")
    with pytest.raises(ValueError, match="target must lie"):
        stablemax_cross_entropy(z, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="target must have shape"):
        stablemax_cross_entropy(z, y[:3])
    with pytest.raises(ValueError, match="integer class"):
        stablemax_cross_entropy(z, y.float())
    with pytest.raises(ValueError, match="floating-point"):
        stablemax(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dim"):
        stablemax(z, dim=2)
    with pytest.raises(ValueError, match="compute_dtype"):
        stablemax_cross_entropy(z, y, compute_dtype=torch.int64)
    with pytest.raises(ValueError, match="same shape"):
        orthogonal_gradient(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="batch_dims"):
        orthogonal_gradient(torch.randn(3), torch.randn(3), batch_dims=2)
    with pytest.raises(ValueError, match="base_optimizer"):
        OrthoGrad([torch.nn.Parameter(torch.randn(2))], "adam")
    with pytest.raises(ValueError, match="n_classes"):
        absorption_gap(1)
    with pytest.raises(ValueError, match="op"):
        modular_arithmetic(5, op="div")
    with pytest.raises(ValueError, match="train_frac"):
        modular_arithmetic(5, train_frac=1.0)
    with pytest.raises(ValueError, match="no parameter"):
        nlm_cosine([torch.nn.Parameter(torch.randn(2))])


# ---------------------------------------------------------------- learns

def _train(kind, steps=150):
    d = modular_arithmetic(13, train_frac=0.7, seed=0)
    m = StackedMLP(2, 26, (48, 48), 13, generator=torch.Generator().manual_seed(0))
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0)
    opt = (OrthoGrad(m.parameters(), torch.optim.AdamW, batch_dims=1, **kw) if kind == "orthograd"
           else torch.optim.AdamW(m.parameters(), **kw))
    y = d.y_train.expand(2, -1)
    for _ in range(steps):
        out = m(d.x_train)
        loss = (stablemax_cross_entropy(out, y, reduction="none") if kind == "stablemax"
                else F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return m(d.x_train).argmax(-1).eq(y).float().mean(-1), m(d.x_test).argmax(-1).eq(d.y_test).float().mean(-1)


@pytest.mark.parametrize("kind", ["stablemax", "orthograd"])
def test_learns_modular_addition_training_set(kind):
    train_acc, _ = _train(kind)
    assert bool((train_acc == 1.0).all())


@pytest.mark.gpu
def test_cuda_matches_cpu():
    z = 30 * torch.randn(64, 23)
    y = torch.randint(0, 23, (64,))
    torch.testing.assert_close(stablemax_cross_entropy(z.cuda(), y.cuda()).cpu(), stablemax_cross_entropy(z, y))
    torch.testing.assert_close(softmax_collapse(z.cuda(), y.cuda()).cpu(), softmax_collapse(z, y))
    g, w = torch.randn(3, 50, 40), torch.randn(3, 50, 40)
    torch.testing.assert_close(orthogonal_gradient(g.cuda(), w.cuda(), batch_dims=1).cpu(),
                               orthogonal_gradient(g, w, batch_dims=1), rtol=1e-5, atol=1e-6)
    m = StackedMLP(2, 10, (16,), 5).cuda()
    opt = OrthoGrad(m.parameters(), torch.optim.AdamW, lr=1e-2, batch_dims=1)
    m(torch.randn(8, 10, device="cuda")).sum().backward()
    opt.step()
    assert m.weights[0].device.type == "cuda"
