import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.episodes import mean_ci, sample_episodes


def _data(n_classes=6, per=12, dim=3):
    y = torch.arange(n_classes).repeat_interleave(per)
    x = torch.randn(len(y), dim, generator=torch.Generator().manual_seed(0))
    return x, y


def test_shapes_labels_and_consistency():
    x, y = _data()
    ep = sample_episodes(x, y, n_way=4, k_shot=2, n_query=3, n_episodes=50, generator=torch.Generator().manual_seed(1))
    assert ep.support.shape == (50, 8, 3) and ep.query.shape == (50, 12, 3)
    assert ep.support_labels[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # loop reference: every point has the class its episode label names, and no point repeats
    for e in range(50):
        idx = torch.cat([ep.support_index[e], ep.query_index[e]])
        assert len(set(idx.tolist())) == len(idx)
        assert len(set(ep.classes[e].tolist())) == 4
        for i, lab in zip(ep.support_index[e], ep.support_labels[e]):
            assert y[i] == ep.classes[e, lab]
        for i, lab in zip(ep.query_index[e], ep.query_labels[e]):
            assert y[i] == ep.classes[e, lab]
    torch.testing.assert_close(ep.support, x[ep.support_index])


def test_seeded_and_restricted_to_classes():
    x, y = _data()
    a = sample_episodes(x, y, n_way=2, k_shot=1, n_query=5, n_episodes=20, classes=[3, 5],
                        generator=torch.Generator().manual_seed(7))
    b = sample_episodes(x, y, n_way=2, k_shot=1, n_query=5, n_episodes=20, classes=[3, 5],
                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.support_index, b.support_index)
    assert set(a.classes.flatten().tolist()) == {3, 5}


def test_uniform_over_classes_and_points():
    x, y = _data(n_classes=5, per=10)
    ep = sample_episodes(x, y, n_way=2, k_shot=1, n_query=1, n_episodes=20000, generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(ep.classes.flatten(), minlength=5).double() / (2 * 20000)
    assert (freq - 0.2).abs().max() < 0.01
    pts = torch.bincount(ep.support_index.flatten(), minlength=50).double()
    assert pts.std() / pts.mean() < 0.1


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 4), st.integers(1, 9))
def test_property_partition(n_way, k, q, e):
    x, y = _data(n_classes=5, per=8)
    ep = sample_episodes(x, y, n_way=n_way, k_shot=k, n_query=q, n_episodes=e, generator=torch.Generator().manual_seed(e))
    assert ep.query_labels.shape == (e, n_way * q)
    both = torch.cat([ep.support_index, ep.query_index], 1)
    assert all(len(set(r.tolist())) == both.shape[1] for r in both)


def test_bad_input():
    x, y = _data()
    with pytest.raises(ValueError, match="n_way"):
        sample_episodes(x, y, n_way=7, k_shot=1, n_query=1, n_episodes=1)
    with pytest.raises(ValueError, match="k_shot"):
        sample_episodes(x, y, n_way=2, k_shot=0, n_query=1, n_episodes=1)
    with pytest.raises(ValueError, match="points"):
        sample_episodes(x, y, n_way=2, k_shot=10, n_query=5, n_episodes=1)
    with pytest.raises(ValueError, match="integer"):
        sample_episodes(x, y.float(), n_way=2, k_shot=1, n_query=1, n_episodes=1)
    with pytest.raises(ValueError, match="same length"):
        sample_episodes(x[:-1], y, n_way=2, k_shot=1, n_query=1, n_episodes=1)
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])


def test_mean_ci():
    m, h = mean_ci([0.0, 1.0] * 50)
    assert m == pytest.approx(0.5) and h == pytest.approx(1.96 * 0.5025 / 10, rel=1e-3)
    assert mean_ci([0.3]) == (0.3, 0.0)


@pytest.mark.gpu
def test_cuda():
    x, y = _data()
    ep = sample_episodes(x.cuda(), y.cuda(), n_way=3, k_shot=2, n_query=2, n_episodes=5,
                         generator=torch.Generator().manual_seed(0))
    assert ep.support.is_cuda and ep.query_labels.is_cuda
    torch.testing.assert_close(ep.support.cpu(), x[ep.support_index.cpu()])
