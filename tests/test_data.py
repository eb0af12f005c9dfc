import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook import data


def test_gaussian_mixture_shapes_and_balance():
    d = data.gaussian_mixture(400, n_classes=4, dim=3, seed=1)
    assert d.x_train.shape == (200, 3) and d.x_test.shape == (200, 3)
    counts = torch.bincount(torch.cat([d.y_train, d.y_test]), minlength=4)
    assert counts.tolist() == [100] * 4
    again = data.gaussian_mixture(400, n_classes=4, dim=3, seed=1)
    assert torch.equal(d.x_train, again.x_train)


@settings(max_examples=30, deadline=None)
@given(rate=st.floats(0, 1), n_classes=st.integers(2, 7), kind=st.sampled_from(["uniform", "pair"]))
def test_flip_labels_changes_exactly_the_rate(rate, n_classes, kind):
    y = torch.arange(200) % n_classes
    g = torch.Generator().manual_seed(0)
    z = data.flip_labels(y, rate, n_classes, kind=kind, generator=g)
    assert (z != y).sum().item() == round(rate * 200)
    assert z.min() >= 0 and z.max() < n_classes
    if kind == "pair":
        changed = z != y
        assert torch.equal(z[changed], (y[changed] + 1) % n_classes)


def test_flip_labels_bad_input():
    y = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="rate"):
        data.flip_labels(y, 1.5, 2)
    with pytest.raises(ValueError, match="kind"):
        data.flip_labels(y, 0.1, 2, kind="odd")
    with pytest.raises(ValueError, match="y must"):
        data.flip_labels(y + 5, 0.1, 2)


def test_make_imbalanced_profile():
    y = torch.arange(1000) % 5
    x = torch.randn(1000, 2)
    xi, yi = data.make_imbalanced(x, y, 10.0, 5, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(yi, minlength=5)
    assert counts[0] == 200 and counts[-1] == 20 and torch.all(counts[:-1] >= counts[1:])
    assert len(xi) == len(yi)


def test_load_sklearn_digits_fixed_split():
    d = data.load_sklearn("digits", seed=0)
    assert d.n_classes == 10 and d.x_train.shape[1] == 64 and d.x_train.dtype == torch.float32
    assert abs(d.x_train.mean().item()) < 1e-3  # standardised on the training set
    img = data.load_sklearn("digits", image=True)
    assert img.x_train.shape[1:] == (1, 8, 8) and 0 <= img.x_train.min() and img.x_train.max() <= 1
    assert torch.equal(data.load_sklearn("digits", seed=0).y_test, d.y_test)
    with pytest.raises(ValueError, match="name"):
        data.load_sklearn("mnist")


def test_tensordata_helpers():
    d = data.load_sklearn("iris")
    small = d.subsample_train(20, generator=torch.Generator().manual_seed(0))
    assert len(small.y_train) == 20 and torch.equal(small.x_test, d.x_test)
    noisy = d.with_train_labels(torch.zeros_like(d.y_train))
    assert noisy.y_train.sum() == 0
    with pytest.raises(ValueError, match="y_train"):
        d.with_train_labels(torch.zeros(3, dtype=torch.int64))


def test_batches_cover_every_point_once():
    x, y = torch.arange(10.0), torch.arange(10)
    seen = torch.cat([yb for _, yb in data.batches(x, y, 3, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(b[0]) for b in data.batches(x, y, 3, drop_last=True)] == [3, 3, 3]
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(x, y, 0))
