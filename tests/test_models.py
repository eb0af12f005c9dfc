import pytest
import torch

from lossbook import models


def test_mlp_shapes():
    m = models.MLP(64, (32, 16), 10)
    assert m(torch.randn(5, 64)).shape == (5, 10)
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)  # flattens images
    with pytest.raises(ValueError, match="widths"):
        models.MLP(0, (4,), 2)


@pytest.mark.parametrize("size,channels", [(8, 1), (32, 3)])
def test_small_cnn_shapes(size, channels):
    m = models.SmallCNN(channels, 7, image_size=size, width=4)
    assert m(torch.randn(2, channels, size, size)).shape == (2, 7)
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(2, channels, size + 1, size + 1))


def test_resnet18_shapes_and_size():
    m = models.resnet18(10)
    n_params = sum(p.numel() for p in m.parameters())
    assert 11.0e6 < n_params < 11.3e6  # the usual CIFAR ResNet-18
    small = models.resnet18(3, width=8)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.gpu
def test_models_on_cuda():
    m = models.SmallCNN(3, 10, image_size=32).cuda()
    assert m(torch.randn(2, 3, 32, 32, device="cuda")).device.type == "cuda"
