"""Tests of the batch-wise two-view augmentations."""

from dataclasses import replace

import pytest
import torch

from dalbt.data.augment import VIEW1, VIEW2, TwoViewAugment, ViewConfig, augment

# Everything off: crop of the whole image, no flip, no colour ops.
OFF = ViewConfig(
    blur_p=0.0, solarize_p=0.0, flip_p=0.0, jitter_p=0.0, gray_p=0.0, crop_scale=(1.0, 1.0)
)
ALL_ON = ViewConfig(blur_p=1.0, solarize_p=1.0, flip_p=1.0, jitter_p=1.0, gray_p=1.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(5, 3, 32, 32), (5, 1, 28, 28), (3, 1, 8, 8), (2, 2, 9, 12)])
@pytest.mark.parametrize("cfg", [VIEW1, VIEW2, ALL_ON])
def test_shape_and_range(shape: tuple[int, ...], cfg: ViewConfig) -> None:
    x = torch.rand(shape)
    out = augment(x, cfg, gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.isfinite(out).all()


def test_deterministic_under_generator() -> None:
    x = torch.rand(8, 3, 32, 32)
    aug = TwoViewAugment()
    a1, a2 = aug(x, gen(1))
    b1, b2 = aug(x, gen(1))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, _ = aug(x, gen(2))
    assert not torch.allclose(a1, c1)


def test_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    TwoViewAugment()(torch.rand(4, 3, 16, 16, generator=gen()), gen(3))
    assert torch.equal(torch.get_rng_state(), state)


def test_views_differ() -> None:
    x = torch.rand(8, 3, 32, 32)
    v1, v2 = TwoViewAugment()(x, gen())
    assert not torch.allclose(v1, v2)
    assert not torch.allclose(v1, x)


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (4, 1, 28, 28), (2, 1, 8, 10)])
def test_full_crop_is_identity(shape: tuple[int, ...]) -> None:
    x = torch.rand(shape)
    assert torch.allclose(augment(x, OFF, gen()), x, atol=1e-5)


def test_flip_only() -> None:
    x = torch.rand(4, 3, 16, 16)
    out = augment(x, replace(OFF, flip_p=1.0), gen())
    assert torch.allclose(out, torch.flip(x, dims=[3]), atol=1e-5)


def test_crop_zooms_in() -> None:
    # A small crop of a horizontal ramp spans a narrower range of values than the full image.
    ramp = torch.linspace(0, 1, 32).expand(16, 1, 32, 32).contiguous()
    out = augment(ramp, replace(OFF, crop_scale=(0.1, 0.2)), gen())
    spans = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert (spans < 0.8).all()


def test_solarize_formula() -> None:
    x = torch.rand(4, 3, 16, 16)
    out = augment(x, replace(OFF, solarize_p=1.0), gen())
    assert torch.allclose(out, torch.where(x >= 0.5, 1 - x, x), atol=1e-5)


def test_grayscale_equal_channels() -> None:
    x = torch.rand(4, 3, 16, 16)
    out = augment(x, replace(OFF, gray_p=1.0), gen())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(out[:, 0], luma, atol=1e-5)
    gray1 = torch.rand(4, 1, 16, 16)
    assert torch.allclose(augment(gray1, replace(OFF, gray_p=1.0), gen()), gray1, atol=1e-5)


def test_blur_constant_and_noise() -> None:
    cfg = replace(OFF, blur_p=1.0)
    const = torch.full((4, 3, 32, 32), 0.3)
    assert torch.allclose(augment(const, cfg, gen()), const, atol=1e-5)
    noise = torch.rand(16, 1, 32, 32, generator=gen(5))
    out = augment(noise, cfg, gen())
    assert (out.var(dim=(1, 2, 3)) < noise.var(dim=(1, 2, 3))).all()
    assert torch.allclose(out.mean(dim=(1, 2, 3)), noise.mean(dim=(1, 2, 3)), atol=0.02)


def test_jitter_changes_colours_and_keeps_gray_gray() -> None:
    cfg = replace(OFF, jitter_p=1.0)
    x = torch.rand(8, 3, 16, 16)
    assert not torch.allclose(augment(x, cfg, gen()), x, atol=1e-3)
    gray = torch.rand(8, 1, 16, 16).expand(-1, 3, -1, -1)
    out = augment(gray, cfg, gen())  # hue and saturation leave gray pixels gray
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-4)
    assert torch.allclose(out[:, 1], out[:, 2], atol=1e-4)


def test_one_channel_all_ops() -> None:
    x = torch.rand(6, 1, 28, 28)
    out = augment(x, ALL_ON, gen())
    assert out.shape == x.shape and 0.0 <= out.min() and out.max() <= 1.0


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        augment(torch.rand(3, 8, 8), VIEW1, gen())
    with pytest.raises(ValueError):
        augment(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), VIEW1, gen())
    with pytest.raises(ValueError):
        ViewConfig(blur_p=2.0, solarize_p=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_input_with_cpu_generator() -> None:
    x = torch.rand(8, 3, 32, 32)
    cpu1, cpu2 = TwoViewAugment()(x, gen(4))
    gpu1, gpu2 = TwoViewAugment()(x.cuda(), gen(4))
    assert gpu1.is_cuda
    assert torch.allclose(gpu1.cpu(), cpu1, atol=1e-4)
    assert torch.allclose(gpu2.cpu(), cpu2, atol=1e-4)
