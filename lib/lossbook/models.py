"""Models shared by the chapters: an MLP, a small CNN for 8×8 digits and 32×32 images, and a
CIFAR-style ResNet-18 for full-scale runs (written here, so torchvision is not needed)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "ResNet18", "resnet18"]


class MLP(nn.Sequential):
    """Fully connected network ``in_dim -> hidden[0] -> ... -> out_dim`` with ReLU between layers.

    Inputs of any shape (N, ...) are flattened. ``MLP(64, (128,), 10)`` is a one-hidden-layer net.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (128,), out_dim: int = 10, *,
                 activation: type[nn.Module] = nn.ReLU, dropout: float = 0.0):
        if in_dim < 1 or out_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"layer widths must be positive, got in_dim={in_dim}, "
                             f"hidden={tuple(hidden)}, out_dim={out_dim}")
        layers: list[nn.Module] = [nn.Flatten()]
        widths = [in_dim, *hidden]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), activation()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-1], out_dim))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Two (three for 32×32) conv–ReLU–pool stages and a linear head.

    ``image_size`` is 8 (scikit-learn digits, 1 channel) or 32 (CIFAR-like, 3 channels).
    ``width`` is the channel count of the first stage; later stages double it.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, *, image_size: int = 8,
                 width: int = 16):
        super().__init__()
        if image_size not in (8, 32):
            raise ValueError(f"image_size must be 8 or 32, got {image_size}")
        n_stages = 2 if image_size == 8 else 3
        layers: list[nn.Module] = []
        c_in, c = in_channels, width
        for _ in range(n_stages):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, c = c, 2 * c
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** n_stages
        self.head = nn.Linear(c_in * side * side, n_classes)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.image_size:
            raise ValueError(f"x must have shape (N, C, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        return self.head(self.features(x).flatten(1))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3×3 conv, no max-pool) for 32×32 inputs."""

    def __init__(self, n_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages, c = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages += [_Block(c, c_out, stride), _Block(c_out, c_out, 1)]
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return self.head(out.mean(dim=(2, 3)))


def resnet18(n_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet18:
    """A CIFAR-style ResNet-18 (11M parameters at ``width=64``)."""
    return ResNet18(n_classes, in_channels, width)
