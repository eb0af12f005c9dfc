r"""Encoders for representation learning on small images: a small conv encoder, an MLP projection
head, and :class:`ContrastiveNet`, the two chained as in SimCLR.

A contrastive method trains ``z = normalize(g(f(x)))`` (the *embedding*, on the unit sphere) and
then evaluates the *representation* ``h = f(x)`` with a probe (:mod:`lossbook.probe`). All sizes are
arguments; the defaults suit scikit-learn's 8×8 digits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContrastiveNet", "ConvEncoder", "ProjectionHead", "StackedContrastiveNet"]


def _positive(**sizes: int) -> None:
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


class ConvEncoder(nn.Module):
    r"""``f``: conv 3×3 (``in_channels → width``), ReLU, conv 3×3 stride 2 (``width → 2·width``), ReLU,
    flatten, linear to ``out_dim``, ReLU. Input ``(N, in_channels, S, S)``, output ``(N, out_dim)``.

    Args:
        in_channels: image channels (1 for digits).
        width: channels of the first convolution (the second has twice as many).
        out_dim: size of the representation ``h``.
        image_size: side ``S`` of the (square) input; even.
        batch_norm: BatchNorm after each convolution (off by default: it couples the samples of a
            batch, and small encoders train well without it).
    """

    def __init__(self, in_channels: int = 1, width: int = 16, out_dim: int = 64, *, image_size: int = 8,
                 batch_norm: bool = False) -> None:
        super().__init__()
        _positive(in_channels=in_channels, width=width, out_dim=out_dim, image_size=image_size)
        if image_size % 2:
            raise ValueError(f"image_size must be even, got {image_size}")
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), norm(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), norm(2 * width), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * (image_size // 2) ** 2, out_dim), nn.ReLU())
        self.in_channels, self.image_size, self.out_dim = in_channels, image_size, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"x must have shape (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        return self.features(x)


class ProjectionHead(nn.Sequential):
    """``g``: linear ``in_dim → hidden``, ReLU, linear ``hidden → out_dim`` (SimCLR's MLP head)."""

    def __init__(self, in_dim: int = 64, hidden: int = 64, out_dim: int = 32) -> None:
        _positive(in_dim=in_dim, hidden=hidden, out_dim=out_dim)
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class ContrastiveNet(nn.Module):
    r"""Encoder ``f`` and projection head ``g``: ``forward(x)`` returns the unit-norm embedding
    :math:`z = g(f(x)) / \lVert g(f(x)) \rVert`; :meth:`features` returns :math:`h = f(x)`.

    Example::

        >>> net = ContrastiveNet(ConvEncoder(width=8, out_dim=32), ProjectionHead(32, 32, 16))
        >>> z = net(torch.rand(4, 1, 8, 8)); z.shape, bool(torch.allclose(z.norm(dim=1), torch.ones(4)))
        (torch.Size([4, 16]), True)
    """

    def __init__(self, encoder: nn.Module | None = None, head: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder if encoder is not None else ConvEncoder()
        self.head = head if head is not None else ProjectionHead(getattr(self.encoder, "out_dim", 64))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation :math:`h = f(x)` (what a probe is fitted on)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(x)), dim=1)


class _StackedLinear(nn.Module):
    """``M`` independent linear maps applied at once: ``(M, N, i) -> (M, N, o)`` (``nn.Linear``'s init per model)."""

    def __init__(self, n_models: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / in_dim ** 0.5
        self.weight = nn.Parameter(torch.empty(n_models, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_models, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class StackedContrastiveNet(nn.Module):
    r"""``n_models`` independent copies of ``ContrastiveNet(ConvEncoder(...), ProjectionHead(...))``
    evaluated in one pass: grouped convolutions (``groups = n_models``), per-model BatchNorm channels and
    batched matrix products. Training the stack with the *sum* of the models' losses and an element-wise
    optimizer (Adam, SGD) trains each model exactly as if it were alone, at a fraction of the per-step
    overhead: the way to sweep a hyper-parameter (e.g. a temperature) over small models.

    ``forward(x)`` takes ``(M, N, C, S, S)`` (model ``m`` embeds ``x[m]``) and returns unit-norm
    embeddings ``(M, N, proj_dim)``; :meth:`features` returns the representations ``(M, N, out_dim)``;
    :meth:`member` copies model ``m`` out as a plain :class:`ContrastiveNet`; :meth:`copy_member_` gives
    several models the same weights.
    """

    def __init__(self, n_models: int, in_channels: int = 1, width: int = 16, out_dim: int = 64, *,
                 image_size: int = 8, proj_hidden: int = 64, proj_dim: int = 32, batch_norm: bool = True,
                 encoder: str = "conv") -> None:
        super().__init__()
        _positive(n_models=n_models, in_channels=in_channels, width=width, out_dim=out_dim, image_size=image_size,
                  proj_hidden=proj_hidden, proj_dim=proj_dim)
        if image_size % 2:
            raise ValueError(f"image_size must be even, got {image_size}")
        if encoder not in ("conv", "mlp"):
            raise ValueError(f"encoder must be 'conv' or 'mlp', got {encoder!r}")
        m, w = n_models, width
        if encoder == "conv":
            norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
            self.conv = nn.Sequential(
                nn.Conv2d(m * in_channels, m * w, 3, padding=1, groups=m), norm(m * w), nn.ReLU(),
                nn.Conv2d(m * w, m * 2 * w, 3, stride=2, padding=1, groups=m), norm(m * 2 * w), nn.ReLU())
            self.fc = _StackedLinear(m, 2 * w * (image_size // 2) ** 2, out_dim)
        else:   # flatten -> linear (width units) -> ReLU -> linear (out_dim) -> ReLU: no convolution, much cheaper on CPU
            self.conv = None
            self.hidden = _StackedLinear(m, in_channels * image_size ** 2, w)
            self.fc = _StackedLinear(m, w, out_dim)
        self.encoder_kind = encoder
        self.head1 = _StackedLinear(m, out_dim, proj_hidden)
        self.head2 = _StackedLinear(m, proj_hidden, proj_dim)
        self.config = dict(in_channels=in_channels, width=width, out_dim=out_dim, image_size=image_size,
                           proj_hidden=proj_hidden, proj_dim=proj_dim, batch_norm=batch_norm, encoder=encoder)
        self.n_models = m

    def features(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.dim() != 5 or x.shape[0] != self.n_models or x.shape[2:] != (c, s, s):
            raise ValueError(f"x must have shape ({self.n_models}, N, {c}, {s}, {s}), got {tuple(x.shape)}")
        m, n = x.shape[:2]
        if self.conv is None:
            return torch.relu(self.fc(torch.relu(self.hidden(x.reshape(m, n, -1)))))
        out = self.conv(x.transpose(0, 1).reshape(n, m * c, s, s))          # (N, M*2w, S/2, S/2)
        out = out.reshape(n, m, -1).transpose(0, 1)                            # (M, N, 2w*(S/2)^2)
        return torch.relu(self.fc(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head2(torch.relu(self.head1(self.features(x)))), dim=-1)

    @torch.no_grad()
    def copy_member_(self, src: int, dst: int | list[int]) -> "StackedContrastiveNet":
        """Overwrite model(s) ``dst`` with model ``src``'s weights and BatchNorm statistics (in place), e.g. so
        that models trained with different losses start from the same initialisation. Returns ``self``."""
        dsts = [dst] if isinstance(dst, int) else list(dst)
        for i in (src, *dsts):
            if not 0 <= i < self.n_models:
                raise ValueError(f"model indices must be in [0, {self.n_models}), got {i}")
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            if name.endswith("num_batches_tracked"):
                continue
            k = t.shape[0] // self.n_models            # stacked linear: k = 1; grouped conv / BatchNorm: channels per model
            for d in dsts:
                t[d * k:(d + 1) * k] = t[src * k:(src + 1) * k]
        return self

    @torch.no_grad()
    def member(self, i: int) -> ContrastiveNet:
        """Model ``i`` as a stand-alone :class:`ContrastiveNet` (same weights, same BatchNorm statistics)."""
        if not 0 <= i < self.n_models:
            raise ValueError(f"i must be in [0, {self.n_models}), got {i}")
        cfg = self.config
        if self.conv is None:
            enc = nn.Sequential(nn.Flatten(), nn.Linear(self.hidden.weight.shape[1], cfg["width"]), nn.ReLU(),
                                nn.Linear(cfg["width"], cfg["out_dim"]), nn.ReLU())
            net = ContrastiveNet(enc, ProjectionHead(cfg["out_dim"], cfg["proj_hidden"], cfg["proj_dim"]))
            net.to(self.fc.weight.device, self.fc.weight.dtype)
            pairs = ((enc[1], self.hidden), (enc[3], self.fc), (net.head[0], self.head1), (net.head[2], self.head2))
            for lin, sl in pairs:
                lin.weight.copy_(sl.weight[i].T)
                lin.bias.copy_(sl.bias[i, 0])
            return net.train(self.training)
        net = ContrastiveNet(ConvEncoder(cfg["in_channels"], cfg["width"], cfg["out_dim"], image_size=cfg["image_size"],
                                         batch_norm=cfg["batch_norm"]),
                             ProjectionHead(cfg["out_dim"], cfg["proj_hidden"], cfg["proj_dim"]))
        net.to(self.fc.weight.device, self.fc.weight.dtype)
        src = [mod for mod in self.conv if not isinstance(mod, nn.ReLU)]
        dst = [mod for mod in net.encoder.features[:6] if not isinstance(mod, nn.ReLU)]
        for a, b in zip(src, dst):
            for name, t in list(a.named_parameters()) + list(a.named_buffers()):
                if name == "num_batches_tracked":
                    getattr(b, name).copy_(t)
                    continue
                k = t.shape[0] // self.n_models
                getattr(b, name).copy_(t[i * k:(i + 1) * k])
        for lin, (sl) in zip((net.encoder.features[7], net.head[0], net.head[2]), (self.fc, self.head1, self.head2)):
            lin.weight.copy_(sl.weight[i].T)
            lin.bias.copy_(sl.bias[i, 0])
        net.train(self.training)
        return net
