import pytest
import torch

from lossbook.probe import fit_logistic, linear_probe


def blobs(n=300, d=5, c=3, sep=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    means = sep * torch.randn(c, d, generator=g)
    return means[y] + torch.randn(n, d, generator=g), y


def test_separable_blobs():
    x, y = blobs()
    r = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert r.accuracy == 1.0 and r.train_accuracy == 1.0
    assert r.weight.shape == (3, 5) and r.bias.shape == (3,)


def test_matches_sklearn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(sep=1.0, seed=1)
    x = x.double()
    n, lam = len(y), 1e-2
    w, b = fit_logistic(x, y, l2=lam, max_iter=500)
    # sklearn minimises C * sum CE + ||w||^2 / 2, i.e. our mean CE + lam/2 ||w||^2 with C = 1 / (lam n)
    ref = sklearn.LogisticRegression(C=1.0 / (lam * n), tol=1e-10, max_iter=5000).fit(x.numpy(), y.numpy())
    torch.testing.assert_close(w, torch.from_numpy(ref.coef_), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b - b.mean(), torch.from_numpy(ref.intercept_ - ref.intercept_.mean()), rtol=1e-3, atol=1e-3)


def test_invariant_to_feature_scale_when_standardized():
    x, y = blobs(sep=1.0, seed=2)
    a = linear_probe(x[:200], y[:200], x[200:], y[200:])
    b = linear_probe(100 * x[:200] + 3, y[:200], 100 * x[200:] + 3, y[200:])
    assert a.accuracy == b.accuracy


def test_bad_input():
    x, y = blobs()
    with pytest.raises(ValueError, match="features"):
        linear_probe(x[:, 0], y, x, y)
    with pytest.raises(ValueError, match="labels"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ValueError, match="h_test"):
        linear_probe(x, y, x[:, :2], y)
    with pytest.raises(ValueError, match="l2"):
        fit_logistic(x, y, l2=-1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        fit_logistic(x, y, n_classes=2)


@pytest.mark.gpu
def test_cuda():
    x, y = blobs()
    r = linear_probe(x[:200].cuda(), y[:200].cuda(), x[200:].cuda(), y[200:].cuda())
    assert r.accuracy == 1.0 and r.weight.device.type == "cuda"


def test_knn_accuracy():
    from lossbook.probe import knn_accuracy
    h_tr = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y_tr = torch.tensor([0, 0, 1, 1])
    h_te = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(h_tr, y_tr, h_te, torch.tensor([0, 1]), k=1) == 1.0
    assert knn_accuracy(h_tr, y_tr, h_te, torch.tensor([1, 1]), k=2) == 0.5
    with pytest.raises(ValueError):
        knn_accuracy(h_tr, y_tr, h_te, torch.tensor([0, 1]), k=9)
