import matplotlib

matplotlib.use("agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from lossbook import metrics, plot  # noqa: E402


def ece_loop(probs, labels, n_bins):
    """Plain transcription of the ECE definition."""
    total, n = 0.0, len(labels)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(n) if (lo < probs[i].max() <= hi) or (b == 0 and probs[i].max() == 0)]
        if not members:
            continue
        conf = sum(float(probs[i].max()) for i in members) / len(members)
        acc = sum(int(probs[i].argmax() == labels[i]) for i in members) / len(members)
        total += len(members) / n * abs(acc - conf)
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_matches_loop(n_bins):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 4, generator=g, dtype=torch.float64), 1)
    labels = torch.randint(0, 4, (200,), generator=g)
    got = float(metrics.expected_calibration_error(probs, labels, n_bins))
    assert got == pytest.approx(ece_loop(probs, labels, n_bins), abs=1e-12)


def test_reliability_bins_and_edge_cases():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    b = metrics.reliability_bins(probs, torch.tensor([0, 1, 1]), n_bins=2)
    assert b.count.tolist() == [1.0, 2.0]  # 0.5 is right-closed into the first bin
    assert b.accuracy.tolist() == [0.0, 1.0]
    perfect = torch.eye(3)
    assert float(metrics.expected_calibration_error(perfect, torch.arange(3))) == 0.0
    with pytest.raises(ValueError, match="labels"):
        metrics.expected_calibration_error(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n_bins"):
        metrics.reliability_bins(probs, torch.tensor([0, 1, 1]), n_bins=0)


def test_top_k():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([1, 2])
    assert float(metrics.top_k_accuracy(logits, y, 1)) == 0.5
    assert float(metrics.top_k_accuracy(logits, y, 2)) == 1.0
    with pytest.raises(ValueError, match="k must"):
        metrics.top_k_accuracy(logits, y, 4)


def test_binary_metrics_hard_and_soft():
    y = torch.tensor([1, 1, 0, 0, 0])
    m = metrics.binary_metrics(torch.tensor([1, 0, 1, 0, 0]), y)
    assert float(m["precision"]) == 0.5 and float(m["recall"]) == 0.5
    assert float(m["f_beta"]) == pytest.approx(0.5)
    assert float(m["balanced_accuracy"]) == pytest.approx((0.5 + 2 / 3) / 2)
    assert float(m["g_mean"]) == pytest.approx((0.5 * 2 / 3) ** 0.5)
    soft = torch.tensor([0.9, 0.2, 0.6, 0.1, 0.0], requires_grad=True)
    metrics.binary_metrics(soft, y)["f_beta"].backward()
    assert soft.grad is not None and torch.isfinite(soft.grad).all()
    tn, fp, fn, tp = metrics.binary_confusion(soft.detach(), y).tolist()
    assert tp == pytest.approx(1.1) and fp == pytest.approx(0.7)
    with pytest.raises(ValueError, match="beta"):
        metrics.binary_metrics(soft, y, beta=0)


def test_reliability_diagram_draws():
    probs = torch.softmax(torch.randn(100, 3), 1)
    y = torch.randint(0, 3, (100,))
    b = metrics.reliability_bins(probs, y, 10)
    ax = plot.reliability_diagram({"model": b}, ece={"model": 0.1})
    assert "ECE 0.100" in ax.get_legend().get_texts()[1].get_text()
