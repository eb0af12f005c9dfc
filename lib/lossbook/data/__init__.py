"""Data for the chapters: synthetic generators, scikit-learn's bundled data sets as tensors with
fixed splits, corruptions (label noise, class imbalance), and real data sets for full-scale runs.

Nothing here touches the network except :func:`load_cifar10`, which imports torchvision lazily and
is only called at ``SCALE="full"``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

__all__ = [
    "TensorData",
    "batches",
    "flip_labels",
    "gaussian_mixture",
    "load_cifar10",
    "load_sklearn",
    "make_imbalanced",
]


@dataclass(frozen=True)
class TensorData:
    """A train/test split held as tensors: ``x_*`` float (N, ...), ``y_*`` int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    name: str = ""

    def to(self, device: str | torch.device) -> "TensorData":
        """The same split on ``device``."""
        return replace(self, **{k: getattr(self, k).to(device)
                                for k in ("x_train", "y_train", "x_test", "y_test")})

    @property
    def n_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    def with_train_labels(self, y_train: torch.Tensor) -> "TensorData":
        """The same split with the training labels replaced (e.g. by noisy ones)."""
        if y_train.shape != self.y_train.shape:
            raise ValueError(f"y_train must have shape {tuple(self.y_train.shape)}, "
                             f"got {tuple(y_train.shape)}")
        return replace(self, y_train=y_train)

    def subsample_train(self, n: int, generator: torch.Generator | None = None) -> "TensorData":
        """Keep ``n`` training points drawn without replacement (the test set is untouched)."""
        if not 0 < n <= len(self.y_train):
            raise ValueError(f"n must be in [1, {len(self.y_train)}], got {n}")
        idx = torch.randperm(len(self.y_train), generator=generator)[:n].to(self.y_train.device)
        return replace(self, x_train=self.x_train[idx], y_train=self.y_train[idx])


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def gaussian_mixture(n: int, n_classes: int = 2, dim: int = 2, *, sep: float = 2.0,
                     std: float = 1.0, test_fraction: float = 0.5,
                     seed: int | torch.Generator | None = 0) -> TensorData:
    r"""Balanced Gaussian classes: class means drawn on a sphere of radius ``sep``, covariance
    :math:`\mathrm{std}^2 I`. ``n`` points in all, split into train and test."""
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if n < 2 * n_classes:
        raise ValueError(f"n must be at least 2 * n_classes = {2 * n_classes}, got {n}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = _generator(seed)
    means = torch.randn(n_classes, dim, generator=g)
    means = sep * means / means.norm(dim=1, keepdim=True)
    y = torch.arange(n) % n_classes
    y = y[torch.randperm(n, generator=g)]
    x = means[y] + std * torch.randn(n, dim, generator=g)
    n_test = int(round(n * test_fraction))
    return TensorData(x[n_test:], y[n_test:], x[:n_test], y[:n_test], n_classes, "gaussian_mixture")


def flip_labels(y: torch.Tensor, rate: float, n_classes: int, *, kind: str = "uniform",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupt a fraction ``rate`` of labels.

    ``kind="uniform"``: a flipped label is drawn uniformly among the *other* classes (symmetric
    noise). ``kind="pair"``: class ``c`` flips to ``c + 1 mod n_classes`` (class-dependent noise).
    Exactly ``round(rate * N)`` labels change, chosen at random.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if kind not in ("uniform", "pair"):
        raise ValueError(f"kind must be 'uniform' or 'pair', got {kind!r}")
    if y.dtype != torch.int64 or (y.numel() and (y.min() < 0 or y.max() >= n_classes)):
        raise ValueError(f"y must be int64 labels in [0, {n_classes}), got {y.dtype}")
    n_flip = int(round(rate * y.numel()))
    idx = torch.randperm(y.numel(), generator=generator)[:n_flip].to(y.device)
    if kind == "uniform":
        shift = torch.randint(1, n_classes, (n_flip,), generator=generator).to(y.device)
    else:
        shift = torch.ones(n_flip, dtype=torch.int64, device=y.device)
    out = y.clone()
    out[idx] = (y[idx] + shift) % n_classes
    return out


def make_imbalanced(x: torch.Tensor, y: torch.Tensor, ratio: float, n_classes: int, *,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Subsample to a long-tailed class profile: class ``c`` keeps
    :math:`n_{\max}\,\rho^{-c/(C-1)}` points, so the largest class is ``ratio`` (ρ) times the
    smallest."""
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    counts = torch.bincount(y, minlength=n_classes)
    n_max = int(counts.min())
    keep = []
    for c in range(n_classes):  # a loop over classes, not samples
        n_c = max(1, int(n_max * ratio ** (-c / max(n_classes - 1, 1))))
        idx_c = torch.nonzero(y == c).flatten()
        perm = torch.randperm(len(idx_c), generator=generator)[:n_c].to(y.device)
        keep.append(idx_c[perm])
    idx = torch.cat(keep)
    return x[idx], y[idx]


_SKLEARN = {
    "digits": "load_digits",
    "iris": "load_iris",
    "wine": "load_wine",
    "breast_cancer": "load_breast_cancer",
}


def load_sklearn(name: str = "digits", *, test_size: float = 0.3, seed: int = 0,
                 standardize: bool = True, image: bool = False,
                 device: str | torch.device = "cpu") -> TensorData:
    """One of scikit-learn's bundled classification sets (no download) as tensors.

    The split is stratified and fixed by ``seed``. ``standardize`` scales features by the
    training set's mean and standard deviation; for ``digits`` with ``image=True`` the pixels
    are instead scaled to [0, 1] and shaped (N, 1, 8, 8) for a CNN.
    """
    if name not in _SKLEARN:
        raise ValueError(f"name must be one of {sorted(_SKLEARN)}, got {name!r}")
    if image and name != "digits":
        raise ValueError("image=True is only meaningful for name='digits'")
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    bunch = getattr(datasets, _SKLEARN[name])()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    if image:
        xtr, xte = xtr / 16.0, xte / 16.0
        xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
    elif standardize:
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return TensorData(t(xtr), t(ytr), t(xte), t(yte), int(y.max()) + 1, name)


_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(root: str = "~/.cache/lossbook", *, classes: tuple[int, ...] | None = None,
                 normalize: bool = True, device: str | torch.device = "cpu") -> TensorData:
    """CIFAR-10 as tensors (downloads through torchvision on first use: full scale only).

    ``classes`` keeps a subset and relabels it ``0..k-1`` (e.g. ``(3, 5)`` for cat vs dog).
    Images are (N, 3, 32, 32) floats, normalised by the usual channel statistics.
    """
    import os

    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - exercised on Colab
        raise ImportError("load_cifar10 needs torchvision: pip install 'lossbook[full]'") from e
    root = os.path.expanduser(root)
    parts = []
    for train in (True, False):
        ds = torchvision.datasets.CIFAR10(root, train=train, download=True)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0
        y = torch.tensor(ds.targets, dtype=torch.int64)
        if normalize:
            x = (x - torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)
        if classes is not None:
            keep = torch.isin(y, torch.tensor(classes))
            x, y = x[keep], y[keep]
            y = torch.searchsorted(torch.tensor(sorted(classes)), y)
        parts += [x, y]
    n_classes = len(classes) if classes is not None else 10
    return TensorData(*parts, n_classes=n_classes, name="cifar10").to(device)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
            generator: torch.Generator | None = None,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors: one permutation per epoch, no DataLoader overhead."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    n = len(x)
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        if order is None:
            yield x[i:i + batch_size], y[i:i + batch_size]
        else:
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]
