import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.classification.anyloss import (METRICS, AnyLoss, anyloss, approximate, max_amplifying_scale,
                                             soft_confusion)


def reference(f, y, metric, L=73.0, beta=1.0):
    """Loop-based float64 transcription of the paper's loss: sigmoid, approximation function, soft
    counts as in the authors' code (TP = sum yA, FP = sum A - TP, FN = sum y - TP, TN = N - sum y - sum A + TP),
    then 1 - metric."""
    f, y = f.tolist(), [float(v) for v in y.tolist()]
    A = []
    for v in f:
        p = 1 / (1 + math.exp(-v))
        A.append(1 / (1 + math.exp(-L * (p - 0.5))))
    n, n1, sA = len(f), sum(y), sum(A)
    tp = sum(a * t for a, t in zip(A, y))
    fp, fn, tn = sA - tp, n1 - tp, n - n1 - sA + tp
    n0 = n - n1
    value = {
        "f_beta": (1 + beta ** 2) * tp / (beta ** 2 * n1 + sA),
        "balanced_accuracy": (n0 * tp + n1 * tn) / (2 * n1 * n0),
        "g_mean": math.sqrt(tp * tn / (n1 * n0)),
        "accuracy": (tp + tn) / n,
        "precision": tp / (tp + fp),
        "recall": tp / n1,
        "specificity": tn / n0,
    }[metric]
    return 1 - value, (tn, fp, fn, tp)


@pytest.mark.parametrize("metric", ["f1", "f_beta", "balanced_accuracy", "g_mean", "accuracy", "precision",
                                    "recall", "specificity"])
@pytest.mark.parametrize("L", [1.0, 10.0, 73.0])
def test_matches_loop_reference(metric, L):
    gen = torch.Generator().manual_seed(0)
    f = 0.5 * torch.randn(50, generator=gen, dtype=torch.float64)      # probabilities near 1/2: A not saturated
    y = (torch.rand(50, generator=gen) < 0.3).long()
    beta = 2.0 if metric == "f_beta" else 1.0
    want, counts = reference(f, y, METRICS[metric], L=L, beta=beta)
    got = anyloss(f, y, metric, L=L, beta=beta)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(soft_confusion(f, y, L=L), torch.tensor(counts, dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)


def test_hard_outputs_give_the_exact_metrics():
    """With A in {0, 1} the soft confusion matrix is the ordinary one: compare with scikit-learn."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, fbeta_score, recall_score

    gen = torch.Generator().manual_seed(1)
    y = (torch.rand(200, generator=gen) < 0.2).long()
    pred = (torch.rand(200, generator=gen) < 0.3).long()
    probs = pred.double()                                   # p in {0, 1}: A(p) = 0 or 1 to float64 precision
    tn, fp, fn, tp = soft_confusion(probs, y, from_logits=False).tolist()
    counts = [int(((pred == a) & (y == b)).sum()) for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))]
    assert [tn, fp, fn, tp] == pytest.approx(counts, abs=1e-9)
    one = lambda m, **kw: 1 - float(anyloss(probs, y, m, from_logits=False, **kw))  # noqa: E731
    assert one("f1") == pytest.approx(f1_score(y, pred), abs=1e-9)
    assert one("f_beta", beta=0.5) == pytest.approx(fbeta_score(y, pred, beta=0.5), abs=1e-9)
    assert one("balanced_accuracy") == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-9)
    tpr, tnr = recall_score(y, pred), recall_score(1 - y, 1 - pred)
    assert one("g_mean") == pytest.approx(math.sqrt(tpr * tnr), abs=1e-9)


def test_approximation_function_properties():
    p = torch.linspace(0, 1, 1001, dtype=torch.float64)
    A = approximate(p, 73.0)
    assert float(approximate(torch.tensor(0.5), 73.0)) == 0.5
    assert bool((A[1:] >= A[:-1]).all()) and bool((A[1:701] > A[:700]).all())  # increasing (flat once rounded to 1)
    torch.testing.assert_close(A + A.flip(0), torch.ones_like(A))  # symmetric: A(1 - p) = 1 - A(p)
    mid = (p > 0.5) & (p < 0.99)
    assert bool((A[mid] > p[mid]).all())                           # amplifies towards the label
    # the derivative is L A (1 - A): L / 4 at p = 1/2
    q = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(approximate(q, 73.0), q)
    assert float(g) == pytest.approx(73 / 4)
    # L <= 4 does not amplify near 1/2
    assert float(approximate(torch.tensor(0.6, dtype=torch.float64), 4.0)) < 0.6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_max_amplifying_scale_is_where_A_saturates(dtype):
    L_max = max_amplifying_scale(dtype)
    one = torch.ones((), dtype=dtype)
    assert float(approximate(one, math.floor(L_max))) < 1            # the largest integer below the bound
    assert float(approximate(one, math.floor(L_max) + 1)) == 1       # one more and A(1) rounds to 1
    if dtype == torch.float64:
        assert math.floor(L_max) == 73                               # the paper's L


def test_matches_sigmoid_and_keeps_the_gradient_where_the_value_rounds_to_one():
    p = torch.linspace(0, 1, 501)
    for L in (2.0, 10.0, 73.0):
        torch.testing.assert_close(approximate(p, L), torch.sigmoid(L * (p - 0.5)), rtol=0, atol=2e-7)
    # float32, L = 73: A(0.9) and A(1) round to exactly 1, but the derivative L e/(1+e)^2 survives
    q = torch.tensor([0.9, 1.0], requires_grad=True)
    A = approximate(q, 73.0)
    assert bool((A == 1).all())
    (g,) = torch.autograd.grad(A.sum(), q)
    e = torch.exp(-73.0 * (q.detach().double() - 0.5))
    torch.testing.assert_close(g.double(), 73 * e / (1 + e) ** 2, rtol=1e-5, atol=0)
    assert bool((g > 0).all())


def test_gradient_at_one_half_is_finite_and_nonzero():
    f = torch.zeros(6, dtype=torch.float64, requires_grad=True)     # every p = 1/2
    y = torch.tensor([1, 0, 0, 1, 0, 0])
    for metric in ("f1", "balanced_accuracy", "g_mean", "accuracy"):
        (g,) = torch.autograd.grad(anyloss(f, y, metric), f)
        assert bool(torch.isfinite(g).all()) and bool((g[y == 1] < 0).all()) and bool((g[y == 0] > 0).all())


def test_balanced_accuracy_gradient_is_inverse_frequency_weighting():
    """d(1 - BAcc)/dA_i = -(y_i / n+ - (1 - y_i) / n-) / 2: a class-weighted linear loss in A."""
    f = torch.randn(40, dtype=torch.float64)
    y = torch.zeros(40, dtype=torch.long)
    y[:7] = 1
    p = torch.sigmoid(f)
    A = approximate(p).requires_grad_()
    loss = 1 - 0.5 * ((A * y).sum() / 7 + ((1 - A) * (1 - y)).sum() / 33)
    (gA,) = torch.autograd.grad(loss, A)
    torch.testing.assert_close(gA, torch.where(y == 1, -0.5 / 7, 0.5 / 33).double())
    torch.testing.assert_close(loss, anyloss(f, y, "bacc"))


def test_callable_metric():
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(30, generator=gen, dtype=torch.float64)
    y = (torch.rand(30, generator=gen) < 0.4).long()
    jaccard = anyloss(f, y, lambda tn, fp, fn, tp: tp / (tp + fp + fn))
    tn, fp, fn, tp = soft_confusion(f, y)
    torch.testing.assert_close(jaccard, 1 - tp / (tp + fp + fn))
    # a callable reproducing a named metric gives the same loss
    f1 = anyloss(f, y, lambda tn, fp, fn, tp: 2 * tp / (2 * tp + fp + fn))
    torch.testing.assert_close(f1, anyloss(f, y, "f1"))


@pytest.mark.parametrize("metric", ["f1", "balanced_accuracy", "g_mean", "accuracy"])
def test_gradcheck(metric):
    f = torch.tensor([-0.03, 0.01, 0.02, -0.015, 0.04, 0.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 1, 0, 0, 1])
    assert torch.autograd.gradcheck(lambda x: anyloss(x, y, metric, L=20.0), (f,))
    assert torch.autograd.gradgradcheck(lambda x: anyloss(x, y, metric, L=20.0), (f,))


metric_names = st.sampled_from(["f1", "balanced_accuracy", "g_mean", "accuracy"])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 64), metric=metric_names, L=st.floats(0.5, 73.0), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(0.0, 30.0))
def test_property_bounded_and_permutation_invariant(n, metric, L, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    f = scale * torch.randn(n, generator=gen)
    y = torch.zeros(n, dtype=torch.long)
    y[torch.randperm(n, generator=gen)[: max(1, n // 3)]] = 1     # both classes present
    y[0] = 0 if y.sum() == n else y[0]
    loss = anyloss(f, y, metric, L=L)
    assert bool(torch.isfinite(loss)) and -1e-5 <= float(loss) <= 1 + 1e-5
    perm = torch.randperm(n, generator=gen)
    torch.testing.assert_close(anyloss(f[perm], y[perm], metric, L=L), loss)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 40), seed=st.integers(0, 2**31 - 1))
def test_property_perfect_scores_give_zero_loss(n, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, dtype=torch.long)
    y[: n // 2] = 1
    f = torch.where(y == 1, 50.0, -50.0).double()                  # confident and right: p = 0 or 1
    for metric in ("f1", "balanced_accuracy", "g_mean", "accuracy"):
        assert float(anyloss(f, y, metric)) == pytest.approx(0, abs=1e-9)


def test_module_and_shapes():
    f, y = torch.randn(8, 1), torch.tensor([0, 1, 0, 0, 1, 0, 0, 1])
    assert torch.equal(AnyLoss("g_mean", L=30.0)(f, y), anyloss(f, y, "g_mean", L=30.0))
    assert torch.equal(anyloss(f, y.view(8, 1)), anyloss(f.view(8), y))
    assert "metric='g_mean'" in repr(AnyLoss("g_mean"))
    # probabilities in, same as logits through the sigmoid
    torch.testing.assert_close(anyloss(torch.sigmoid(f), y, from_logits=False), anyloss(f, y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(dtype):
    f = torch.randn(32).to(dtype).requires_grad_()
    y = (torch.arange(32) % 4 == 0).long()
    loss = anyloss(f, y, "f1")
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    (g,) = torch.autograd.grad(loss, f)
    assert g.dtype == dtype and bool(torch.isfinite(g.float()).all())


def test_bad_input_names_the_argument():
    f, y = torch.zeros(4), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="logits"):
        anyloss(torch.zeros(4, 2), y)
    with pytest.raises(ValueError, match="logits"):
        anyloss(torch.zeros(4, dtype=torch.int64), y)
    with pytest.raises(ValueError, match="probs"):
        anyloss(torch.zeros(4, 3), y, from_logits=False)
    with pytest.raises(ValueError, match="target"):
        anyloss(f, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="target.*binary"):
        anyloss(f, torch.tensor([-1, 1, 1, -1]))
    with pytest.raises(ValueError, match="metric"):
        anyloss(f, y, "auc")
    with pytest.raises(ValueError, match="metric"):
        AnyLoss("mcc2")
    with pytest.raises(ValueError, match="0-d"):
        anyloss(f, y, lambda tn, fp, fn, tp: torch.stack([tp, tn]))
    for bad in (0.0, -1.0, math.inf, math.nan, True, "73"):
        with pytest.raises(ValueError, match="L "):
            anyloss(f, y, L=bad)
    with pytest.raises(ValueError, match="beta"):
        anyloss(f, y, "f_beta", beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        AnyLoss("f_beta", beta=-2.0)
    with pytest.raises(ValueError, match="p must"):
        approximate(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="dtype"):
        max_amplifying_scale(torch.int32)


def test_tiny_training_learns_the_minority_class():
    """On a 10 %-positive problem, full-batch training with AnyLoss-F1 reaches a high F1."""
    from lossbook.metrics import binary_metrics

    torch.manual_seed(0)
    x = torch.randn(400, 2)
    y = (x[:, 0] + 0.5 * x[:, 1] > 1.4).long()           # about 10 % positives, separable
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    f1 = lambda: float(binary_metrics((model(x).squeeze(1) > 0).float(), y)["f_beta"])  # noqa: E731
    before = f1()
    for _ in range(80):
        loss = anyloss(model(x), y, "f1")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert f1() > 0.9 and f1() > before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_host_sync():
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(1000, generator=gen, dtype=torch.float64)
    y = (torch.rand(1000, generator=gen) < 0.1).long()
    for metric in ("f1", "balanced_accuracy", "g_mean"):
        torch.testing.assert_close(anyloss(f.cuda(), y.cuda(), metric).cpu(), anyloss(f, y, metric))
    fc = f.float().cuda().requires_grad_()
    yc = y.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        anyloss(fc, yc, "f1").backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fc.grad.device.type == "cuda" and bool(torch.isfinite(fc.grad).all())
