r"""Batched augmentations for small images ``(N, C, H, W)``, for contrastive (SimCLR-style) training.

Every function draws one independent random transform per image, in a handful of tensor operations
(no Python loop over the batch), on the images' device, from an optional ``torch.Generator``
(on any device: its draws are moved to the images' device). Two calls with generators seeded alike
give the same views. :func:`augment` chains them; :func:`two_views` returns the pair of views of a
batch that a contrastive loss compares.

Functions: :func:`random_crop` (pad and crop, i.e. a random shift), :func:`random_flip`,
:func:`gaussian_noise`, :func:`random_erasing`, :func:`augment`, :func:`two_views`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["augment", "gaussian_noise", "random_crop", "random_erasing", "random_flip", "two_views"]


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor of images (N, C, H, W), got shape "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")


def _check_prob(p: float, name: str) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    return float(p)


def _where(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else x.device


def _randint(high: int, n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` integers uniform in ``[0, high)`` (high >= 1) on ``x.device``."""
    return torch.randint(0, high, (n,), generator=generator, device=_where(generator, x)).to(x.device)


def _rand(shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=_where(generator, x)).to(x.device)


def random_crop(x: torch.Tensor, padding: int = 1, *, generator: torch.Generator | None = None,
                fill: float = 0.0) -> torch.Tensor:
    r"""Pad each image by ``padding`` pixels (value ``fill``) and cut out an ``H × W`` window at a
    uniformly random offset: a random translation by :math:`(\delta_y, \delta_x) \in
    \{-p, \dots, p\}^2`, with the uncovered border set to ``fill``.

    .. math:: x'_{n,c,i,j} = \tilde x_{n,c,\,i + p + \delta_{y,n},\, j + p + \delta_{x,n}},

    :math:`\tilde x` the padded image. One gather for the whole batch.

    Args:
        x: images ``(N, C, H, W)``, floating point.
        padding: :math:`p \ge 0`, the largest shift in pixels (0 returns ``x`` unchanged).
        generator: optional ``torch.Generator`` for the offsets.
        fill: value of the padding.

    Example::

        >>> x = torch.arange(16.).view(1, 1, 4, 4)
        >>> random_crop(x, 1, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([1, 1, 4, 4])
    """
    _check_images(x)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding), value=fill)
    dy = _randint(2 * padding + 1, n, x, generator)
    dx = _randint(2 * padding + 1, n, x, generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]        # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]        # (N, 1, W)
    idx = (rows * (w + 2 * padding) + cols).reshape(n, 1, h * w).expand(n, c, h * w)
    return xp.reshape(n, c, -1).gather(2, idx).reshape(n, c, h, w)


def random_flip(x: torch.Tensor, p: float = 0.5, *, dim: int = -1,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image along ``dim`` (-1: left-right, -2: up-down) with probability ``p``.

    (Mirroring changes the meaning of digits; for them keep ``p = 0``.)
    """
    _check_images(x)
    p = _check_prob(p, "p")
    if dim not in (-1, -2, 2, 3):
        raise ValueError(f"dim must be -1/3 (width) or -2/2 (height), got {dim!r}")
    flip = _rand((x.shape[0],), x, generator) < p
    return torch.where(flip[:, None, None, None], x.flip(dim), x)


def gaussian_noise(x: torch.Tensor, std: float = 0.1, *, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Add i.i.d. noise :math:`\varepsilon \sim \mathcal N(0, \mathrm{std}^2)` to every pixel."""
    _check_images(x)
    if not float(std) >= 0.0:
        raise ValueError(f"std must be >= 0, got {std!r}")
    if std == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=_where(generator, x), dtype=x.dtype)
    return x + std * noise.to(x.device)


def random_erasing(x: torch.Tensor, p: float = 0.5, size: int | tuple[int, int] = 2, *,
                   generator: torch.Generator | None = None, value: float = 0.0) -> torch.Tensor:
    r"""With probability ``p`` per image, set a ``size``-pixel square (or ``(h, w)`` rectangle) at a
    uniformly random position, lying inside the image, to ``value`` (random erasing / cutout).

    The rectangle is a mask built by comparing pixel coordinates with each image's corner:
    :math:`m_{n,i,j} = [y_n \le i < y_n + h]\,[x_n \le j < x_n + w]\,[u_n < p]`.
    """
    _check_images(x)
    p = _check_prob(p, "p")
    eh, ew = (size, size) if isinstance(size, int) else tuple(size)
    n, _, h, w = x.shape
    if not (isinstance(eh, int) and isinstance(ew, int) and 1 <= eh <= h and 1 <= ew <= w):
        raise ValueError(f"size must be an int or (h, w) with 1 <= h <= {h} and 1 <= w <= {w}, got {size!r}")
    y0 = _randint(h - eh + 1, n, x, generator)[:, None, None]
    x0 = _randint(w - ew + 1, n, x, generator)[:, None, None]
    on = (_rand((n,), x, generator) < p)[:, None, None]
    i = torch.arange(h, device=x.device)[None, :, None]
    j = torch.arange(w, device=x.device)[None, None, :]
    mask = on & (i >= y0) & (i < y0 + eh) & (j >= x0) & (j < x0 + ew)       # (N, H, W)
    return x.masked_fill(mask[:, None], value)


def augment(x: torch.Tensor, *, generator: torch.Generator | None = None, shift: int = 1,
            flip_p: float = 0.0, noise_std: float = 0.1, erase_p: float = 0.5,
            erase_size: int | tuple[int, int] = 2) -> torch.Tensor:
    """One random view of each image: :func:`random_crop` (shift up to ``shift`` px), then
    :func:`random_flip` (``flip_p``), :func:`random_erasing` (``erase_p``, ``erase_size``) and
    :func:`gaussian_noise` (``noise_std``). The defaults suit 8×8 digits.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> augment(torch.rand(5, 1, 8, 8), generator=g).shape
        torch.Size([5, 1, 8, 8])
    """
    x = random_crop(x, shift, generator=generator)
    if flip_p:
        x = random_flip(x, flip_p, generator=generator)
    if erase_p:
        x = random_erasing(x, erase_p, erase_size, generator=generator)
    return gaussian_noise(x, noise_std, generator=generator)


def two_views(x: torch.Tensor, *, generator: torch.Generator | None = None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent :func:`augment` views of the batch (keyword arguments are passed on)."""
    return augment(x, generator=generator, **kw), augment(x, generator=generator, **kw)
