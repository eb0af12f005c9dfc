import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.curvature import PassCounter
from lossbook.optimizers.saf import SAM, EMATeacher, MESALoss, OutputMemory, SAFLoss, trajectory_loss


def kl_reference(z, z_past, tau):
    """Loop-based float64 transcription of tau^2 KL(softmax(z_past/tau) || softmax(z/tau)), batch mean."""
    total = 0.0
    for row, past in zip(z.tolist(), z_past.tolist()):
        zp = [math.exp(v / tau) for v in row]
        zq = [math.exp(v / tau) for v in past]
        p = [v / sum(zp) for v in zp]
        q = [v / sum(zq) for v in zq]
        total += tau ** 2 * sum(qc * (math.log(qc) - math.log(pc)) for pc, qc in zip(p, q))
    return total / len(z)


@pytest.mark.parametrize("tau", [0.5, 1.0, 5.0, 20.0])
def test_trajectory_loss_matches_loop_reference(tau):
    gen = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(9, 5, generator=gen, dtype=torch.float64)
    zp = 3 * torch.randn(9, 5, generator=gen, dtype=torch.float64)
    got = trajectory_loss(z, zp, temperature=tau)
    assert abs(float(got) - kl_reference(z, zp, tau)) < 1e-12
    # at tau = 1 it is torch's KL divergence with the past as target
    if tau == 1.0:
        ref = F.kl_div(F.log_softmax(z, 1), F.log_softmax(zp, 1), log_target=True, reduction="batchmean")
        torch.testing.assert_close(got, ref)


def test_special_cases():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
    assert float(trajectory_loss(z, z)) == 0.0
    # a constant added to a row (either side) changes nothing: softmax is shift-invariant
    shift = torch.tensor([[4.0], [-7.0]], dtype=torch.float64)
    zp = z.flip(1)
    torch.testing.assert_close(trajectory_loss(z + shift, zp), trajectory_loss(z, zp - shift))


def test_high_temperature_limit_is_half_the_variance_of_the_logit_change():
    """tau^2 KL -> (1/2C) sum_c (d_c - mean d)^2 with d = z - z_past: a squared distance between centred logits."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    zp = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    d = z - zp
    limit = 0.5 * d.var(dim=1, unbiased=False).mean()
    torch.testing.assert_close(trajectory_loss(z, zp, temperature=1e4), limit, rtol=1e-3, atol=0)


def test_gradient_is_tau_times_probability_difference():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    zp = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    tau = 3.0
    trajectory_loss(z, zp, temperature=tau).backward()
    expected = tau * (torch.softmax(z.detach() / tau, 1) - torch.softmax(zp.detach() / tau, 1)) / 5
    torch.testing.assert_close(z.grad, expected)
    assert zp.grad is None                      # the past is a fixed target


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    zp = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: trajectory_loss(t, zp, temperature=2.0), (z,))
    assert torch.autograd.gradcheck(lambda t: trajectory_loss(t, zp, weight=w, reduction="sum"), (z,))


def test_weights_and_reductions():
    gen = torch.Generator().manual_seed(4)
    z, zp = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    per = trajectory_loss(z, zp, reduction="none")
    assert per.shape == (6,) and bool((per >= 0).all())
    torch.testing.assert_close(trajectory_loss(z, zp, reduction="sum"), per.sum())
    mask = torch.tensor([True, False, True, True, False, False])
    torch.testing.assert_close(trajectory_loss(z, zp, weight=mask), per[mask].mean())
    assert float(trajectory_loss(z, zp, weight=torch.zeros(6))) == 0.0


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 1e3), tau=st.floats(0.1, 50.0))
def test_property_non_negative_finite_and_zero_only_at_equal_softmax(seed, scale, tau):
    gen = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(8, 6, generator=gen)
    zp = scale * torch.randn(8, 6, generator=gen)
    loss = trajectory_loss(z, zp, temperature=tau, reduction="none")
    # KL >= 0; float32 rounding of the log-probabilities, magnified by tau^2, may dip just below
    assert bool(torch.isfinite(loss).all()) and bool((loss >= -1e-5 * tau ** 2 * (1 + scale)).all())
    assert float(trajectory_loss(zp + 3.0, zp, temperature=tau).abs()) < 1e-3


def test_half_precision_and_autocast():
    z = torch.randn(4, 10, dtype=torch.bfloat16, requires_grad=True)
    zp = torch.randn(4, 10, dtype=torch.bfloat16)
    loss = trajectory_loss(z, zp)
    assert loss.dtype == torch.bfloat16
    (g,) = torch.autograd.grad(loss, z)
    assert bool(torch.isfinite(g.float()).all())


def test_memory_ring_buffer_against_a_loop_reference():
    n, c, lag = 6, 3, 2
    mem = OutputMemory(n, c, lag)
    history = {}                                   # (epoch, sample) -> logits, the loop reference
    gen = torch.Generator().manual_seed(5)
    for epoch in range(7):
        order = torch.randperm(n, generator=gen)
        for idx in order.split(4):
            if epoch == 4 and 5 in idx.tolist():   # sample 5 skipped at epoch 4 (a dropped batch)
                idx = idx[idx != 5]
            out = torch.randn(len(idx), c, generator=gen)
            mem.put(idx, out, epoch)
            for i, row in zip(idx.tolist(), out):
                history[(epoch, i)] = row
            past, valid = mem.get(idx, epoch)
            for i, row, ok in zip(idx.tolist(), past, valid.tolist()):
                expect = history.get((epoch - lag, i))
                assert ok == (expect is not None)
                if ok:
                    assert torch.equal(row, expect)
    # epoch 6 reads epoch 4: sample 5 was not seen then
    _, valid = mem.get(torch.arange(n), 6)
    assert valid.tolist() == [True] * 5 + [False]


def test_memory_state_dict_round_trip():
    mem = OutputMemory(5, 2, lag=1)
    mem.put(torch.tensor([0, 3]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), epoch=0)
    other = OutputMemory(5, 2, lag=1)
    other.load_state_dict(mem.state_dict())
    past, valid = other.get(torch.tensor([0, 3, 4]), epoch=1)
    assert valid.tolist() == [True, True, False] and torch.equal(past[:2], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert "lag=1" in repr(other)


def test_saf_loss_is_ce_before_start_and_adds_the_lagged_kl_after():
    n, c, lag, lam, tau, start = 8, 4, 2, 0.3, 5.0, 3
    loss_fn = SAFLoss(n, c, lam=lam, temperature=tau, lag=lag, start_epoch=start, end_epoch=6)
    gen = torch.Generator().manual_seed(6)
    y = torch.randint(0, c, (n,), generator=gen)
    idx = torch.arange(n)
    outs = [torch.randn(n, c, generator=gen, dtype=torch.float64) for _ in range(8)]
    for epoch, z in enumerate(outs):
        got = loss_fn(z.float(), y, idx, epoch)
        ce = F.cross_entropy(z, y)
        on = start < epoch < 6
        expected = ce + (lam * kl_reference(z, outs[epoch - lag], tau) if on else 0.0)
        assert abs(float(got) - float(expected)) < 1e-5, epoch
        assert loss_fn.active(epoch) == on
        assert (float(loss_fn.last_trajectory) > 0) == on


def test_saf_lambda_zero_is_plain_cross_entropy_and_label_smoothing_is_passed():
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    f = SAFLoss(4, 3, lam=0.0, start_epoch=0, lag=1, label_smoothing=0.1)
    for epoch in range(3):
        torch.testing.assert_close(f(z, y, torch.arange(4), epoch), F.cross_entropy(z, y, label_smoothing=0.1))


def test_saf_state_dict_round_trip_keeps_the_memory():
    a = SAFLoss(4, 3, lag=1, start_epoch=0)
    z, y, idx = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4)
    a(z, y, idx, 0)
    b = SAFLoss(4, 3, lag=1, start_epoch=0)
    b.load_state_dict(a.state_dict())
    z1 = torch.randn(4, 3)
    torch.testing.assert_close(b(z1, y, idx, 1), a(z1, y, idx, 1))
    assert float(b.last_trajectory) > 0


def test_ema_teacher_update_matches_loop_reference_and_stays_in_eval():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    teacher = EMATeacher(model, decay=0.9)
    ref = {k: v.clone().double() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 3))                      # moves the batch-norm statistics
        teacher.update(model)
        for k, v in model.state_dict().items():
            ref[k] = v.double() if not v.is_floating_point() else 0.9 * ref[k] + 0.1 * v.double()
    for k, v in teacher.module.state_dict().items():
        torch.testing.assert_close(v.double(), ref[k], rtol=1e-5, atol=1e-6)
    teacher.train()
    assert not teacher.module.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher(torch.randn(2, 3)).requires_grad is False
    copy_all = EMATeacher(model, decay=0.0)
    copy_all.update(model)
    assert all(torch.equal(a, b) for a, b in zip(copy_all.module.parameters(), model.parameters()))


def test_mesa_loss_uses_the_teacher_outputs():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3).double()
    f = MESALoss(model, decay=0.5, lam=0.8, temperature=5.0, start_epoch=0)
    with torch.no_grad():
        model.weight.add_(1.0)                        # the student moves away from its teacher
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    z = model(x)
    expected = F.cross_entropy(z, y) + 0.8 * kl_reference(z.detach(), f.teacher(x), 5.0)
    assert abs(float(f(z, y, x, epoch=1).detach()) - float(expected.detach())) < 1e-10
    torch.testing.assert_close(f(z, y, x, epoch=0), F.cross_entropy(z, y))     # not yet on
    sd = f.state_dict()
    g = MESALoss(model, start_epoch=0)
    g.load_state_dict(sd)
    torch.testing.assert_close(g(z, y, x, 1), f(z, y, x, 1))


def quad_loss(w, A, b):
    return 0.5 * w @ A @ w - b @ w + 0.25 * (w ** 4).sum()


def test_sam_step_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    A = A @ A.T
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    w0 = torch.randn(5, generator=gen, dtype=torch.float64)
    rho, lr = 0.1, 0.05

    def grad_at(v):
        v = v.clone().requires_grad_()
        (g,) = torch.autograd.grad(quad_loss(v, A, b), v)
        return g

    g = grad_at(w0)
    expected = w0 - lr * grad_at(w0 + rho * g / g.norm())
    w = w0.clone().requires_grad_()
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)

    def closure():
        opt.zero_grad()
        loss = quad_loss(w, A, b)
        loss.backward()
        return loss

    loss = opt.step(closure)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, quad_loss(w0, A, b))     # the loss at the unperturbed weights


def test_sam_norm_is_global_over_groups_and_groups_keep_their_rho():
    a = torch.tensor([3.0], requires_grad=True)
    b = torch.tensor([4.0], requires_grad=True)
    opt = SAM([{"params": [a]}, {"params": [b], "rho": 0.0}], torch.optim.SGD, rho=0.5, lr=0.1)
    (0.5 * a ** 2 + 0.5 * b ** 2).sum().backward()     # grad (3, 4): norm 5
    opt.first_step()
    torch.testing.assert_close(a.detach(), torch.tensor([3.0 + 0.5 * 3 / 5]))
    torch.testing.assert_close(b.detach(), torch.tensor([4.0]))
    opt.second_step()
    torch.testing.assert_close(a.detach(), torch.tensor([3.0 - 0.1 * 3.0]))    # back to theta, then the step


def test_sam_with_rho_zero_is_the_base_optimizer():
    torch.manual_seed(2)
    m1 = torch.nn.Linear(3, 2)
    m2 = torch.nn.Linear(3, 2)
    m2.load_state_dict(m1.state_dict())
    sam = SAM(m1.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        sam.step(lambda: (sam.zero_grad(), F.cross_entropy(m1(x), y).backward())[0])
        sgd.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        sgd.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q)


def test_sam_state_dict_round_trip_and_scheduler():
    def make(seed=0):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        return m, SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def step(m, opt, x, y):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss
        return opt.step(closure)

    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(6)]
    m1, o1 = make()
    sched = torch.optim.lr_scheduler.StepLR(o1, step_size=1, gamma=0.5)
    for x, y in data[:3]:
        step(m1, o1, x, y)
        sched.step()
    assert o1.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)   # groups are shared
    sd = copy.deepcopy(o1.state_dict())   # a state_dict shares its tensors with the live optimizer
    assert "momentum_buffer" in sd["state"][0] and "old_p" not in sd["state"][0]
    m2, o2 = make(seed=1)
    m2.load_state_dict(m1.state_dict())
    o2.load_state_dict(sd)
    assert o2.base_optimizer.state is o2.state and o2.base_optimizer.param_groups is o2.param_groups
    for x, y in data[3:]:
        step(m1, o1, x, y)
        step(m2, o2, x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_costs_in_passes_per_step():
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 3)
    x, y, idx = torch.randn(10, 4), torch.randint(0, 3, (10,)), torch.arange(10)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with PassCounter(model) as c:
        sam.step(lambda: (sam.zero_grad(), F.cross_entropy(model(x), y).backward())[0])
    assert (c.forward, c.backward) == (2, 2)
    saf = SAFLoss(10, 3, lag=1, start_epoch=0)
    saf(model(x).detach() + torch.randn(10, 3), y, idx, 0)
    with PassCounter(model) as c:
        saf(model(x), y, idx, 1).backward()
    assert (c.forward, c.backward) == (1, 1) and float(saf.last_trajectory) > 0
    mesa = MESALoss(model, start_epoch=0)
    with PassCounter(model, mesa.teacher) as c:
        mesa(model(x), y, x, 1).backward()
    assert (c.forward, c.backward) == (2, 1)


def test_bad_input_names_the_argument():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="past_logits must have the shape"):
        trajectory_loss(z, torch.randn(3, 5))
    with pytest.raises(ValueError, match="logits must be a floating-point"):
        trajectory_loss(torch.zeros(3, 4, dtype=torch.int64), z)
    with pytest.raises(ValueError, match="logits must be a floating-point"):
        trajectory_loss(torch.zeros(4), torch.zeros(4))
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="temperature"):
            trajectory_loss(z, z, temperature=bad)
    with pytest.raises(ValueError, match="reduction"):
        trajectory_loss(z, z, reduction="avg")
    with pytest.raises(ValueError, match="weight must have shape"):
        trajectory_loss(z, z, weight=torch.ones(4))
    with pytest.raises(ValueError, match="lag"):
        OutputMemory(5, 3, lag=0)
    with pytest.raises(ValueError, match="n_samples"):
        OutputMemory(0, 3)
    mem = OutputMemory(5, 3)
    with pytest.raises(ValueError, match="index must be a 1-d int64"):
        mem.put(torch.tensor([0.0, 1.0]), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="logits must have shape"):
        mem.put(torch.tensor([0, 1]), torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match="epoch"):
        mem.get(torch.tensor([0]), -1)
    with pytest.raises(ValueError, match="lam"):
        SAFLoss(5, 3, lam=-0.1)
    with pytest.raises(ValueError, match="start_epoch"):
        SAFLoss(5, 3, start_epoch=-1)
    with pytest.raises(ValueError, match="label_smoothing"):
        SAFLoss(5, 3, label_smoothing=1.0)
    with pytest.raises(ValueError, match="target must be int64"):
        SAFLoss(3, 4)(z, torch.zeros(3), torch.arange(3), 0)
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(torch.nn.Linear(2, 2), decay=1.0)
    with pytest.raises(ValueError, match="rho"):
        SAM(torch.nn.Linear(2, 2).parameters(), rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": torch.nn.Linear(2, 2).parameters(), "rho": math.nan}], lr=0.1)
    opt = SAM(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.first_step()


def test_tiny_training_learns_with_saf_mesa_and_sam():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=gen)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0).long())          # three classes
    for method in ("SAF", "MESA", "SAM"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        opt = (SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9) if method == "SAM"
               else torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9))
        saf = SAFLoss(300, 3, lag=1, start_epoch=2)
        mesa = MESALoss(model, decay=0.9, start_epoch=2)
        order = torch.Generator().manual_seed(1)
        for epoch in range(15):
            for idx in torch.randperm(300, generator=order).split(50):
                if method == "SAM":
                    opt.step(lambda: (opt.zero_grad(), F.cross_entropy(model(x[idx]), y[idx]).backward())[0])
                    continue
                out = model(x[idx])
                loss = saf(out, y[idx], idx, epoch) if method == "SAF" else mesa(out, y[idx], x[idx], epoch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if method == "MESA":
                    mesa.update(model)
        acc = (model(x).argmax(1) == y).float().mean()
        assert acc > 0.93, (method, float(acc))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_steps_never_sync():
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(16, 10, generator=gen, dtype=torch.float64)
    zp = torch.randn(16, 10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(trajectory_loss(z.cuda(), zp.cuda()).cpu(), trajectory_loss(z, zp))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).cuda()
    x = torch.randn(32, 8, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    idx = torch.arange(32, device="cuda")
    saf = SAFLoss(32, 10, lag=1, start_epoch=0, device="cuda")
    mesa = MESALoss(model, start_epoch=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    saf(model(x).detach(), y, idx, 0)
    sgd.zero_grad(); saf(model(x), y, idx, 0).backward(); sgd.step()   # warm-up: allocate the state  # noqa: E702
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for epoch in (1, 2):
            sgd.zero_grad()
            saf(model(x), y, idx, epoch).backward()
            sgd.step()
            sgd.zero_grad()
            mesa(model(x), y, x, epoch).backward()
            sgd.step()
            mesa.update(model)

            def closure():
                sam.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            sam.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert saf.memory.logits.device.type == "cuda" and float(saf.last_trajectory) > 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_sam_foreach_path_equals_the_per_parameter_loop_in_float64():
    def run(foreach):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
        m[0].bias.requires_grad_(False)                  # a parameter without a gradient is skipped
        opt = SAM([{"params": list(m[0].parameters())}, {"params": list(m[2].parameters()), "rho": 0.2}],
                  torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, foreach=foreach)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss
        for _ in range(5):
            opt.step(closure)
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="foreach"):
        SAM(torch.nn.Linear(2, 2).parameters(), rho=0.1, lr=0.1, foreach="yes")
