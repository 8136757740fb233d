"""BYOL / Barlow Twins style two-view augmentations, applied batch-wise on tensors.

Each call of :func:`augment` draws every random parameter of the whole batch at once, on the
device of the given ``torch.Generator`` (normally the CPU), and moves them to ``x.device``: the
same generator state gives the same output on any device, and CUDA inputs work with a CPU
generator. The pipeline (in this order, as in the Barlow Twins code):

1. random resized crop (always), resized back to the input size, and horizontal flip, both as one
   per-sample affine sampling grid (bilinear). Crop boxes follow torchvision's
   ``RandomResizedCrop`` (10 tries of a scale uniform in ``crop_scale`` and a log-uniform aspect
   ratio, else a centred crop) but are continuous (not rounded to whole pixels);
2. colour jitter with probability ``jitter_p``: brightness, contrast, saturation and hue with
   per-sample factors, applied in a per-sample random order (as torchvision's ``ColorJitter``),
   clamped to ``[0, 1]`` after each step. Saturation and hue need RGB and are skipped for other
   channel counts. Hue is a rotation of the chroma plane in YIQ space, an approximation of the
   HSV hue shift;
3. grayscale with probability ``gray_p`` (luma for RGB, channel mean otherwise; no-op for one
   channel);
4. Gaussian blur with probability ``blur_p``: sigma uniform in ``[0.1, 2.0]``, odd kernel of about
   10 % of the shorter image side (at least 3), reflect padding;
5. solarisation with probability ``solarize_p``: ``x >= 0.5 -> 1 - x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ (NTSC); the inverse is computed numerically.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)
_RGB_TO_YIQ_T = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
_YIQ_TO_RGB_T = torch.linalg.inv(_RGB_TO_YIQ_T)
_CROP_TRIES = 10
# Columns of the per-sample uniform draws.
_SCALE = slice(0, _CROP_TRIES)
_RATIO = slice(_CROP_TRIES, 2 * _CROP_TRIES)
_POS_X, _POS_Y, _FLIP, _JITTER = 20, 21, 22, 23
_FACTORS = slice(24, 28)  # brightness, contrast, saturation, hue
_ORDER = slice(28, 32)
_GRAY, _BLUR, _SIGMA, _SOLAR = 32, 33, 34, 35
_N_UNIFORMS = 36


@dataclass(frozen=True)
class ViewConfig:
    """Parameters of one augmented view.

    Attributes:
        blur_p: Probability of Gaussian blur.
        solarize_p: Probability of solarisation.
        flip_p: Probability of a horizontal flip.
        jitter_p: Probability of colour jitter.
        gray_p: Probability of conversion to grayscale.
        brightness: Brightness factor drawn from ``[max(0, 1 - b), 1 + b]``.
        contrast: Contrast factor drawn from ``[max(0, 1 - c), 1 + c]``.
        saturation: Saturation factor drawn from ``[max(0, 1 - s), 1 + s]``.
        hue: Hue shift drawn from ``[-hue, hue]`` (fraction of a full turn, at most 0.5).
        crop_scale: Range of the crop area as a fraction of the image area.
        crop_ratio: Range of the crop aspect ratio (width / height).
    """

    blur_p: float
    solarize_p: float
    flip_p: float = 0.5
    jitter_p: float = 0.8
    gray_p: float = 0.2
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        for name in ("blur_p", "solarize_p", "flip_p", "jitter_p", "gray_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability, got {value}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")


VIEW1 = ViewConfig(blur_p=1.0, solarize_p=0.0)
VIEW2 = ViewConfig(blur_p=0.1, solarize_p=0.2)


def _crop_flip_theta(u: torch.Tensor, cfg: ViewConfig, height: int, width: int) -> torch.Tensor:
    """Affine matrices ``(B, 2, 3)`` mapping output to input normalised coordinates."""
    area = height * width
    lo, hi = cfg.crop_scale
    scale = lo + (hi - lo) * u[:, _SCALE]
    log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, _RATIO])
    w_try = torch.sqrt(area * scale * ratio)
    h_try = torch.sqrt(area * scale / ratio)
    valid = (w_try <= width) & (h_try <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid try
    found = valid.any(dim=1)
    # Fallback as torchvision: centred crop of the whole image with the ratio clamped to range.
    in_ratio = width / height
    if in_ratio < cfg.crop_ratio[0]:
        fb_w, fb_h = float(width), width / cfg.crop_ratio[0]
    elif in_ratio > cfg.crop_ratio[1]:
        fb_w, fb_h = height * cfg.crop_ratio[1], float(height)
    else:
        fb_w, fb_h = float(width), float(height)
    w = torch.where(found, w_try.gather(1, first).squeeze(1), fb_w)
    h = torch.where(found, h_try.gather(1, first).squeeze(1), fb_h)
    x0 = torch.where(found, u[:, _POS_X] * (width - w), (width - w) / 2)
    y0 = torch.where(found, u[:, _POS_Y] * (height - h), (height - h) / 2)
    sign = torch.where(u[:, _FLIP] < cfg.flip_p, -1.0, 1.0).to(u.dtype)
    theta = torch.zeros(u.shape[0], 2, 3, dtype=u.dtype, device=u.device)
    # x_in = cx + (w / W) * sign * x_out, in [-1, 1] coordinates (align_corners=False).
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    return theta


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, 1, H, W)``: luma for RGB, channel mean otherwise."""
    if x.shape[1] == 3:
        weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(b + factor * (a - b))`` with a per-sample ``factor`` of shape ``(B,)``."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0.0, 1.0)


def _hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """Per-sample RGB matrices ``(B, 3, 3)`` rotating the IQ chroma plane by ``2 pi shift``."""
    to_yiq = _RGB_TO_YIQ_T.to(dtype=shift.dtype, device=shift.device)
    from_yiq = _YIQ_TO_RGB_T.to(dtype=shift.dtype, device=shift.device)
    angle = 2 * math.pi * shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(shift.shape[0], 3, 3, dtype=shift.dtype, device=shift.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return from_yiq @ rot @ to_yiq


def _factor(u: torch.Tensor, strength: float) -> torch.Tensor:
    """Map uniforms in ``[0, 1)`` to factors uniform in ``[max(0, 1 - s), 1 + s]``."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


def _color_jitter(x: torch.Tensor, u: torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
    """Colour jitter in a per-sample random order; samples not selected are left unchanged."""
    rgb = x.shape[1] == 3
    apply = u[:, _JITTER] < cfg.jitter_p
    fb, fc, fs, fh = u[:, _FACTORS].unbind(dim=1)
    bright = _factor(fb, cfg.brightness)
    contr = _factor(fc, cfg.contrast)
    satur = _factor(fs, cfg.saturation)
    hue_m = _hue_matrices(cfg.hue * (2 * fh - 1)) if rgb and cfg.hue > 0 else None

    def brightness(img: torch.Tensor) -> torch.Tensor:
        return (img * bright.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)

    def contrast(img: torch.Tensor) -> torch.Tensor:
        return _blend(img, _gray(img).mean(dim=(1, 2, 3), keepdim=True), contr)

    def saturation(img: torch.Tensor) -> torch.Tensor:
        return _blend(img, _gray(img), satur)

    def hue(img: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bij,bjhw->bihw", hue_m, img).clamp_(0.0, 1.0)

    ops = [
        (brightness, cfg.brightness > 0),
        (contrast, cfg.contrast > 0),
        (saturation, rgb and cfg.saturation > 0),
        (hue, hue_m is not None),
    ]
    order = u[:, _ORDER].argsort(dim=1)  # a uniformly random permutation per sample
    for step in range(len(ops)):
        for index, (op, enabled) in enumerate(ops):
            if enabled:
                mask = apply & (order[:, step] == index)
                x = torch.where(mask.view(-1, 1, 1, 1), op(x), x)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable blur with a per-sample ``sigma`` ``(B,)`` as grouped convolutions."""
    b, c, h, w = x.shape
    k = max(3, round(0.1 * min(h, w)))
    k += 1 - k % 2  # odd
    pad = k // 2
    t = torch.arange(k, dtype=x.dtype, device=x.device) - pad
    kernel = torch.exp(-(t**2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    mode = "reflect" if pad < min(h, w) else "replicate"
    out = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode=mode)
    out = F.conv2d(out, kernel.view(b * c, 1, k, 1), groups=b * c)
    out = F.conv2d(out, kernel.view(b * c, 1, 1, k), groups=b * c)
    return out.view(b, c, h, w)


def augment(x: torch.Tensor, cfg: ViewConfig, generator: torch.Generator,
            rows: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor:
    """Apply one random view of the pipeline to every image of a batch.

    Args:
        x: ``(B, C, H, W)`` float images in ``[0, 1]``, on any device.
        cfg: View parameters.
        generator: Source of all randomness (its device is where parameters are drawn).
        rows: When ``x`` is part of a larger batch of ``total`` images (a distributed run's
            shard), its rows in that batch, (B,) int64: the parameters of the whole batch are
            drawn (the generator advances as for the whole batch) and each image gets those of
            its row, so it is augmented exactly as in the whole batch.
        total: Size of the whole batch (with ``rows``).

    Returns:
        ``(B, C, H, W)`` augmented images in ``[0, 1]``, same dtype and device as ``x``.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    if (rows is None) != (total is None) or (rows is not None and len(rows) != len(x)):
        raise ValueError("rows and total go together, with one row per image of x")
    b, c, h, w = x.shape
    u = torch.rand(b if total is None else total, _N_UNIFORMS, generator=generator,
                   device=generator.device)
    if rows is not None:
        u = u[rows.to(u.device)]
    u = u.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    theta = _crop_flip_theta(u, cfg, h, w).to(x.dtype)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    u = u.to(x.dtype)

    if cfg.jitter_p > 0:
        out = _color_jitter(out, u, cfg)
    if cfg.gray_p > 0 and c > 1:
        mask = (u[:, _GRAY] < cfg.gray_p).view(-1, 1, 1, 1)
        out = torch.where(mask, _gray(out).expand(-1, c, -1, -1), out)
    if cfg.blur_p > 0:
        mask = (u[:, _BLUR] < cfg.blur_p).view(-1, 1, 1, 1)
        out = torch.where(mask, _gaussian_blur(out, 0.1 + 1.9 * u[:, _SIGMA]), out)
    if cfg.solarize_p > 0:
        mask = (u[:, _SOLAR] < cfg.solarize_p).view(-1, 1, 1, 1)
        out = torch.where(mask & (out >= 0.5), 1.0 - out, out)
    return out.clamp_(0.0, 1.0)


class TwoViewAugment:
    """Produce the two asymmetric Barlow Twins views of a batch.

    Args:
        view1: Parameters of the first view (default: blur always, no solarisation).
        view2: Parameters of the second view (default: blur 0.1, solarisation 0.2).
    """

    def __init__(self, view1: ViewConfig = VIEW1, view2: ViewConfig = VIEW2) -> None:
        self.view1 = view1
        self.view2 = view2

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator, rows: torch.Tensor | None = None,
        total: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``x`` ``(B, C, H, W)`` twice; returns two ``(B, C, H, W)`` tensors.

        ``rows`` and ``total``: ``x`` is a shard of a larger batch (see :func:`augment`).
        """
        return (augment(x, self.view1, generator, rows, total),
                augment(x, self.view2, generator, rows, total))
