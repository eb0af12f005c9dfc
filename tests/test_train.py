import pytest
import torch
import torch.nn.functional as F

from lossbook import data, models, train


def _fit(seed=0, **kw):
    torch.manual_seed(seed)
    d = data.gaussian_mixture(400, n_classes=3, dim=2, sep=4.0, seed=0)
    m = models.MLP(2, (16,), 3)
    g = torch.Generator().manual_seed(seed)
    return m, train.fit(m, F.cross_entropy, d, epochs=15, batch_size=32, lr=1e-2, generator=g, **kw)


def test_fit_learns_and_logs():
    _, h = _fit()
    assert len(h) == 15 and h["epoch"] == list(range(1, 16))
    assert h.last("test_acc") > 0.9
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert h.best("test_acc") >= h.last("test_acc")


def test_fit_is_deterministic():
    _, h1 = _fit(seed=1)
    _, h2 = _fit(seed=1)
    assert h1.metrics == h2.metrics


def test_fit_with_batch_loss_and_eval_fn():
    d = data.gaussian_mixture(100, seed=0)
    m = models.MLP(2, (8,), 2)
    h = train.fit(m, None, d, epochs=2, batch_loss=lambda mod, x, y: F.cross_entropy(mod(x), y),
                  eval_fn=lambda mod, dd: {"n": 1.0}, schedule="cosine", optimizer="sgd", lr=0.1)
    assert h["n"] == [1.0, 1.0]


def test_fit_bad_input():
    d = data.gaussian_mixture(100, seed=0)
    m = models.MLP(2, (8,), 2)
    with pytest.raises(ValueError, match="epochs"):
        train.fit(m, F.cross_entropy, d, epochs=0)
    with pytest.raises(ValueError, match="exactly one"):
        train.fit(m, None, d, epochs=1)
    with pytest.raises(ValueError, match="optimizer"):
        train.fit(m, F.cross_entropy, d, epochs=1, optimizer="lbfgs")
    with pytest.raises(KeyError, match="recorded"):
        train.History()["nope"]


def test_accuracy_binary_and_multiclass():
    assert train.accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])).item() == 0.5
    assert train.accuracy(torch.tensor([1.0, -1.0, 2.0]), torch.tensor([1, 0, 0])).item() == pytest.approx(2 / 3)


def test_predict_restores_training_mode():
    m = models.MLP(2, (4,), 2)
    m.train()
    train.predict(m, torch.randn(3, 2))
    assert m.training


@pytest.mark.gpu
def test_fit_on_cuda():
    m, h = _fit(device="cuda")
    assert next(m.parameters()).device.type == "cuda" and h.last("test_acc") > 0.9
