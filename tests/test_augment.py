import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.augment import augment, gaussian_noise, random_crop, random_erasing, random_flip, two_views


def imgs(n=6, c=2, h=8, w=8, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_random_crop_matches_loop_reference():
    x, p = imgs(), 2
    out = random_crop(x, p, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)                     # the same draws, in the same order
    dy = torch.randint(0, 2 * p + 1, (6,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (6,), generator=g)
    ref = torch.zeros_like(x)
    for n in range(6):
        for i in range(8):
            for j in range(8):
                si, sj = i + int(dy[n]) - p, j + int(dx[n]) - p
                if 0 <= si < 8 and 0 <= sj < 8:
                    ref[n, :, i, j] = x[n, :, si, sj]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_identities_and_extremes():
    x = imgs()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop(x, 0, generator=g), x)
    assert torch.equal(random_flip(x, 0.0, generator=g), x)
    assert torch.equal(random_flip(x, 1.0, generator=g), x.flip(-1))
    assert torch.equal(random_flip(x, 1.0, dim=-2, generator=g), x.flip(-2))
    assert torch.equal(gaussian_noise(x, 0.0, generator=g), x)
    assert torch.equal(random_erasing(x, 0.0, generator=g), x)


def test_random_erasing_erases_one_square_per_image():
    x = torch.ones(50, 1, 8, 8)
    out = random_erasing(x, 1.0, 3, generator=torch.Generator().manual_seed(1))
    zero = out[:, 0] == 0
    assert (zero.sum((1, 2)) == 9).all()
    rows, cols = zero.any(2), zero.any(1)                     # a 3x3 block: 3 consecutive rows and columns
    assert (rows.sum(1) == 3).all() and (cols.sum(1) == 3).all()
    rect = random_erasing(x, 1.0, (2, 4), generator=torch.Generator().manual_seed(1))
    assert ((rect == 0).sum((1, 2, 3)) == 8).all()


def test_noise_statistics():
    x = torch.zeros(200, 1, 8, 8)
    e = gaussian_noise(x, 0.5, generator=torch.Generator().manual_seed(2))
    assert abs(float(e.mean())) < 0.02 and abs(float(e.std()) - 0.5) < 0.02


def test_reproducible_and_views_differ():
    x = imgs()
    a = augment(x, generator=torch.Generator().manual_seed(5))
    b = augment(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    v1, v2 = two_views(x, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(v1, v2)


@settings(max_examples=30, deadline=None)
@given(p=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_property_crop_is_a_shift(p, seed):
    """An image with an empty border of width p keeps its pixels (as a multiset) under any shift <= p."""
    x = torch.zeros(4, 1, 10, 10)
    x[:, :, p:10 - p, p:10 - p] = torch.rand(4, 1, 10 - 2 * p, 10 - 2 * p, generator=torch.Generator().manual_seed(seed))
    out = random_crop(x, p, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values, rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="x must"):
        random_crop(torch.rand(8, 8), 1)
    with pytest.raises(ValueError, match="floating"):
        random_flip(torch.ones(2, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="padding"):
        random_crop(imgs(), -1)
    with pytest.raises(ValueError, match="p must"):
        random_flip(imgs(), 1.5)
    with pytest.raises(ValueError, match="dim"):
        random_flip(imgs(), 0.5, dim=1)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise(imgs(), -0.1)
    with pytest.raises(ValueError, match="size"):
        random_erasing(imgs(), 0.5, 9)


@pytest.mark.gpu
def test_cuda_generator_and_device():
    x = imgs().cuda()
    out = augment(x, generator=torch.Generator("cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.shape == x.shape
    cpu_gen = augment(x, generator=torch.Generator().manual_seed(0))       # a CPU generator also works
    ref = augment(x.cpu(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cpu_gen.cpu(), ref)
