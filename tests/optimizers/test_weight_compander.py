import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils import parametrize

from lossbook.optimizers.weight_compander import (KINDS, Compander, apply_weight_compander, compander,
                                                  compander_derivative, compander_inverse, compander_penalty,
                                                  compandered, param_groups, register_compander,
                                                  remove_weight_compander, weight_stats)

_FUNS = {"arctan": (math.atan, math.tan), "erf": (math.erf, None), "arsinh": (math.asinh, math.sinh)}


def reference(v, a, b, kind):
    """Loop-based float64 transcription of Psi(v) = a * f(v / b)."""
    f = _FUNS[kind][0]
    return torch.tensor([a * f(x / b) for x in v.reshape(-1).tolist()], dtype=torch.float64).reshape(v.shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("a,b", [(1.0, 0.6), (0.5, 0.5), (0.7, 1.0), (2.0, 0.3)])
def test_matches_loop_reference(kind, a, b):
    v = 3 * torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(compander(v, a, b, kind=kind), reference(v, a, b, kind), rtol=1e-12, atol=1e-12)


def test_paper_special_cases():
    # a = b = 1 is plain arctan (the paper's Fig. 2); the bound is a*pi/2; the slope at 0 is a/b
    v = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(compander(v, 1.0, 1.0), torch.atan(v))
    big = compander(torch.tensor([1e12, -1e12], dtype=torch.float64), 0.8, 0.5)
    torch.testing.assert_close(big, torch.tensor([0.4 * math.pi, -0.4 * math.pi], dtype=torch.float64))
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(compander(x, 1.0, 0.6).sum(), x)
    torch.testing.assert_close(g, torch.tensor([1.0 / 0.6], dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_and_derivative_in_terms_of_w(kind):
    a, b = 0.8, 0.5
    v = torch.linspace(-1, 1, 41, dtype=torch.float64, requires_grad=True)   # erf(v/b) stays well below 1
    w = compander(v, a, b, kind=kind)
    (dv,) = torch.autograd.grad(w.sum(), v)
    torch.testing.assert_close(compander_inverse(w.detach(), a, b, kind=kind), v.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(compander_derivative(w.detach(), a, b, kind=kind), dv, rtol=1e-9, atol=1e-12)


def test_arctan_gradient_is_papers_eq3():
    """dL/dv = dL/dw * (a/b) / (1 + v^2/b^2), the paper's eq. (3), against autograd."""
    a, b = 1.0, 0.6
    v = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    target = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss = ((compander(v, a, b) - target) ** 2).sum()
    (gv,) = torch.autograd.grad(loss, v)
    gw = 2 * (compander(v.detach(), a, b) - target)
    torch.testing.assert_close(gv, gw * (a / b) / (1 + v.detach() ** 2 / b ** 2))


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    v = torch.tensor([-1.7, -0.2, 0.0, 0.4, 2.5], dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, a, b: compander(v, a, b, kind=kind), (v, a, b))
    assert torch.autograd.gradgradcheck(lambda v, a, b: compander(v, a, b, kind=kind), (v, a, b))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=32),
       a=st.floats(0.05, 5.0), b=st.floats(0.05, 5.0), kind=st.sampled_from(KINDS))
def test_property_odd_monotone_bounded(values, a, b, kind):
    v = torch.tensor(values, dtype=torch.float32)
    w = compander(v, a, b, kind=kind)
    assert bool(torch.isfinite(w).all())
    torch.testing.assert_close(compander(-v, a, b, kind=kind), -w)                  # odd
    order = v.argsort()
    assert bool((w[order].diff() >= 0).all())                                        # non-decreasing
    if kind == "arctan":
        assert bool((w.abs() <= a * math.pi / 2 * (1 + 1e-6)).all())                # |w| < a pi / 2
    if kind == "erf":
        assert bool((w.abs() <= a * (1 + 1e-6)).all())


@settings(max_examples=40, deadline=None)
@given(a=st.floats(0.5, 1.0), b=st.floats(0.5, 1.0), scale=st.floats(0.01, 0.7))
def test_property_derivative_largest_at_zero(a, b, scale):
    w = torch.linspace(-scale, scale, 33, dtype=torch.float64) * a
    d = compander_derivative(w, a, b)
    assert float(d.max()) == pytest.approx(a / b) and bool((d > 0).all())
    assert bool((d[16:].diff() <= 1e-15).all())                                       # decreasing in |w|


def test_parametrization_preserves_function_and_trains_v():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(28, 3))
    x = torch.randn(5, 6)
    net2 = nn.Sequential(net[0], net[1], nn.Unflatten(1, (1, 16)), net[2], net[3], net[4])
    before = net2(x)
    names = apply_weight_compander(net, a=1.0, b=0.6)
    assert names == ["0", "2", "4"]
    torch.testing.assert_close(net2(x), before, rtol=1e-5, atol=1e-6)
    params = dict(net.named_parameters())
    assert "0.parametrizations.weight.original" in params and "0.bias" in params and "0.weight" not in params
    v = net[0].parametrizations.weight.original
    torch.testing.assert_close(net[0].weight, compander(v, 1.0, 0.6))
    assert len(list(compandered(net))) == 3
    remove_weight_compander(net)
    assert "0.weight" in dict(net.named_parameters()) and not parametrize.is_parametrized(net[0])
    torch.testing.assert_close(net2(x), before, rtol=1e-5, atol=1e-6)


def test_any_layer_and_tensor():
    emb = nn.Embedding(10, 4)
    register_compander(emb, "weight", a=2.0, b=1.0, kind="arsinh")
    assert isinstance(emb.parametrizations.weight[0], Compander)
    bn = nn.BatchNorm1d(4)
    register_compander(bn, "weight", a=1.0, b=1.0)                  # works on any float tensor attribute
    torch.testing.assert_close(bn.weight, torch.ones(4))


def test_learnable_a_b_get_gradients_and_no_decay():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    apply_weight_compander(net, a=0.5, b=1.0, learnable=True)
    net(torch.randn(3, 4)).square().sum().backward()
    comp = net[0].parametrizations.weight[0]
    assert comp.a.grad is not None and comp.b.grad is not None
    groups = param_groups(net, 1e-4, decay_on="v")
    decays = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decays[id(comp.a)] == 0.0 and decays[id(net[0].parametrizations.weight.original)] == 1e-4
    assert decays[id(net[0].bias)] == 1e-4
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_weight_decay_on_w_has_gradient_lambda_w_psi_prime():
    net = nn.Sequential(nn.Linear(5, 4))
    apply_weight_compander(net, a=1.0, b=0.6)
    net = net.double()
    v = net[0].parametrizations.weight.original
    (g,) = torch.autograd.grad(compander_penalty(net), v)
    w = net[0].weight.detach()
    torch.testing.assert_close(g, w * compander_derivative(w, 1.0, 0.6))
    groups = param_groups(net, 0.1)                                  # decay_on="w": v is not decayed by the optimizer
    assert groups[0]["params"][0] is v and groups[0]["weight_decay"] == 0.0


def test_sgd_step_on_v_is_preconditioned_step_on_w():
    """First order: one SGD step of size eta on v moves w by -eta * Psi'(v)^2 * dL/dw."""
    torch.manual_seed(3)
    layer = nn.Linear(8, 3).double()
    register_compander(layer, a=1.0, b=0.6)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    loss = ((layer(x) - y) ** 2).mean()
    (gw,) = torch.autograd.grad(loss, layer.parametrizations.weight.original)
    gw = gw / compander_derivative(w0, 1.0, 0.6)                     # dL/dw
    eta = 1e-5
    with torch.no_grad():
        layer.parametrizations.weight.original -= eta * gw * compander_derivative(w0, 1.0, 0.6)
    predicted = w0 - eta * compander_derivative(w0, 1.0, 0.6) ** 2 * gw
    torch.testing.assert_close(layer.weight.detach(), predicted, rtol=0, atol=1e-9)


def test_weight_stats():
    s = weight_stats([torch.tensor([-1.0, 1.0, -1.0, 1.0])])
    assert s["max_abs"] == 1.0 and s["frac_near_zero"] == 0.0 and s["kurtosis"] == pytest.approx(-2.0)
    s = weight_stats([torch.tensor([0.0, 0.0, 0.001, 1.0])])
    assert s["frac_near_zero"] == 0.75
    net = nn.Sequential(nn.Linear(4, 4))
    apply_weight_compander(net, a=0.5, b=0.5)
    assert weight_stats(net)["max_abs"] == pytest.approx(float(net[0].weight.detach().abs().max()))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="kind"):
        compander(torch.zeros(2), kind="mu-law")
    for bad in (0.0, -1.0, math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="^a "):
            compander(torch.zeros(2), a=bad)
        with pytest.raises(ValueError, match="^b "):
            Compander(1.0, bad)
    with pytest.raises(ValueError, match="^a "):
        compander(torch.zeros(2), a=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="v must"):
        compander(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="w must"):
        compander_inverse(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="bounds"):
        register_compander(nn.Linear(2, 2).requires_grad_(False).apply(lambda m: m.weight.fill_(3.0)
                                                                        if isinstance(m, nn.Linear) else None),
                           a=1.0, b=0.6)
    with pytest.raises(ValueError, match="no floating-point tensor"):
        register_compander(nn.ReLU())
    layer = register_compander(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already"):
        register_compander(layer)
    with pytest.raises(ValueError, match="layer_types"):
        apply_weight_compander(nn.Linear(2, 2), layer_types=(int,))
    with pytest.raises(ValueError, match="decay_on"):
        param_groups(layer, 0.1, decay_on="both")
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(layer, -0.1)
    with pytest.raises(ValueError, match="no compandered"):
        compander_penalty(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="weights must"):
        weight_stats([])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    v = (3 * torch.randn(64)).to(dtype).requires_grad_()
    w = compander(v, 1.0, 0.6)
    (g,) = torch.autograd.grad(w.float().sum(), v)
    assert w.dtype == dtype and bool(torch.isfinite(w).all()) and bool(torch.isfinite(g).all())


def test_tiny_training_learns():
    torch.manual_seed(0)
    x = torch.randn(256, 2)
    t = (x[:, 0] - 0.5 * x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    apply_weight_compander(model, a=1.0, b=0.6)
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    before = (model(x).argmax(1) == t).float().mean()
    for _ in range(150):
        idx = torch.randint(0, 256, (32,))
        loss = nn.functional.cross_entropy(model(x[idx]), t[idx]) + 1e-4 * compander_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = (model(x).argmax(1) == t).float().mean()
    assert after > 0.95 and after > before
    assert float(model[0].weight.detach().abs().max()) < math.pi / 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(4)
    cpu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    gpu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    gpu.load_state_dict(cpu.state_dict())
    for m in (cpu, gpu):
        apply_weight_compander(m, a=1.0, b=0.6, learnable=True)
    gpu = gpu.cuda()
    x = torch.randn(8, 3, 8, 8)
    out_c, out_g = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-4, atol=1e-5)
    out_c.square().sum().backward()
    out_g.square().sum().backward()
    gc = cpu[0].parametrizations.weight.original.grad
    gg = gpu[0].parametrizations.weight.original.grad
    torch.testing.assert_close(gg.cpu(), gc, rtol=1e-4, atol=1e-5)
    # the forward pass of the parametrization never waits on the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu(x.cuda()).sum().backward()
        compander(torch.randn(100, device="cuda"), torch.tensor(1.0, device="cuda"), torch.tensor(0.6, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
