import pytest
import torch

from lossbook.encoders import ContrastiveNet, ConvEncoder, ProjectionHead, StackedContrastiveNet


def test_shapes_and_unit_norm():
    net = ContrastiveNet(ConvEncoder(1, 8, 32), ProjectionHead(32, 16, 8))
    x = torch.rand(5, 1, 8, 8)
    assert net.features(x).shape == (5, 32)
    z = net(x)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    big = ConvEncoder(3, 4, 10, image_size=16, batch_norm=True)
    assert big(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    assert ContrastiveNet()(torch.rand(3, 1, 8, 8)).shape == (3, 32)


@pytest.mark.parametrize("encoder", ["conv", "mlp"])
@pytest.mark.parametrize("train", [True, False])
def test_stacked_equals_its_members(encoder, train):
    torch.manual_seed(0)
    net = StackedContrastiveNet(3, width=8 if encoder == "conv" else 24, out_dim=16, proj_hidden=12, proj_dim=6,
                                encoder=encoder)
    x = torch.rand(3, 10, 1, 8, 8)
    net.train(train)
    z, h = net(x), net.features(x)
    for i in range(3):
        member = net.member(i)
        torch.testing.assert_close(member(x[i]), z[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(member.features(x[i]), h[i], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z[0], z[1])                  # the members are different models


@pytest.mark.parametrize("encoder", ["conv", "mlp"])
def test_copy_member(encoder):
    torch.manual_seed(2)
    net = StackedContrastiveNet(3, width=8, out_dim=8, proj_hidden=8, proj_dim=4, encoder=encoder)
    x = torch.rand(3, 7, 1, 8, 8)
    x[2] = x[0]
    net.eval()
    before = net(x)
    net.copy_member_(0, [2])
    after = net(x)
    torch.testing.assert_close(after[2], after[0], rtol=0, atol=0)
    torch.testing.assert_close(after[:2], before[:2], rtol=0, atol=0)    # the others are untouched
    with pytest.raises(ValueError, match="indices"):
        net.copy_member_(0, 3)


def test_stacked_members_do_not_interact():
    """A loss on model 1 alone gives zero gradient to every other model's slice of the weights."""
    torch.manual_seed(1)
    net = StackedContrastiveNet(3, width=4, out_dim=8, proj_hidden=8, proj_dim=4)
    net(torch.rand(3, 6, 1, 8, 8))[1].sum().backward()
    w = net.fc.weight.grad
    assert w[1].abs().sum() > 0 and w[0].abs().sum() == 0 and w[2].abs().sum() == 0
    c = net.conv[0].weight.grad                            # grouped conv: output channels 4..7 are model 1's
    assert c[4:8].abs().sum() > 0 and c[:4].abs().sum() == 0 and c[8:].abs().sum() == 0


def test_bad_input():
    with pytest.raises(ValueError, match="width"):
        ConvEncoder(1, 0, 8)
    with pytest.raises(ValueError, match="image_size"):
        ConvEncoder(1, 4, 8, image_size=7)
    with pytest.raises(ValueError, match="x must"):
        ConvEncoder()(torch.rand(2, 1, 9, 9))
    with pytest.raises(ValueError, match="hidden"):
        ProjectionHead(4, 0, 2)
    with pytest.raises(ValueError, match="encoder"):
        StackedContrastiveNet(2, encoder="vit")
    with pytest.raises(ValueError, match="x must"):
        StackedContrastiveNet(2)(torch.rand(3, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="i must"):
        StackedContrastiveNet(2).member(2)


@pytest.mark.gpu
def test_cuda():
    net = StackedContrastiveNet(2, width=4).cuda()
    x = torch.rand(2, 5, 1, 8, 8, device="cuda")
    torch.testing.assert_close(net.member(1)(x[1]), net(x)[1], rtol=1e-4, atol=1e-5)
