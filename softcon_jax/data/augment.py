"""Multispectral augmentations on whole (C, H, W) float32 arrays, any band count.

Vectorised NumPy / SciPy re-implementations of the torchvision transforms the
reference methods use, generalised from RGB to C bands:

- ``sample_crop_box``: ``RandomResizedCrop.get_params`` (10 tries, then a
  centre crop with the ratio clamped);
- ``resize_bilinear``: bilinear resize with torch's ``align_corners=False``
  (``F.interpolate(..., antialias=False)``) coordinates;
- ``color_jitter``: brightness (scale) and contrast (blend with the mean) in a
  random order, with factors drawn per band (or shared), clamped to the
  normaliser's output range when it has one;
- ``grayscale``: every band replaced by the band mean (RGB grayscale analogue);
- ``gaussian_blur``: separable Gaussian, sigma drawn from a range;
- ``hflip``.

All randomness comes from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges; ``blur_prob`` is per view (view i uses item i % len)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    per_band_jitter: bool = True
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, ...] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def sample_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: tuple[float, float], ratio: tuple[float, float]
                    ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop, as torchvision RandomResizedCrop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _bilinear_coords(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (C, H, W) to (C, *size), float32, torch coordinates."""
    x = np.asarray(x, np.float32)
    y0, y1, wy = _bilinear_coords(x.shape[1], size[0])
    x0, x1, wx = _bilinear_coords(x.shape[2], size[1])
    wy = wy[:, None]
    rows = x[:, y0, :] * (1 - wy) + x[:, y1, :] * wy  # (C, S0, W)
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def hflip(x: np.ndarray) -> np.ndarray:
    """Horizontal flip of (C, H, W)."""
    return x[:, :, ::-1]


def color_jitter(x: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                 per_band: bool = True,
                 value_range: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Brightness then contrast, or the reverse (random), on (C, H, W)."""
    c = x.shape[0]
    n = c if per_band else 1
    lo, hi = (None, None) if value_range is None else (
        np.reshape(value_range[0], (-1, 1, 1)), np.reshape(value_range[1], (-1, 1, 1)))
    for op in rng.permutation(2):
        if op == 0 and brightness > 0:
            f = rng.uniform(max(0.0, 1 - brightness), 1 + brightness, n).astype(np.float32)
            x = x * f.reshape(-1, 1, 1)
        elif op == 1 and contrast > 0:
            f = rng.uniform(max(0.0, 1 - contrast), 1 + contrast, n).astype(np.float32)
            mean = x.mean(axis=(1, 2), keepdims=True) if per_band else x.mean()
            x = (x - mean) * f.reshape(-1, 1, 1) + mean
        if lo is not None:
            x = np.clip(x, lo, hi)
    return x


def grayscale(x: np.ndarray) -> np.ndarray:
    """Every band replaced by the mean over bands."""
    return np.broadcast_to(x.mean(axis=0, keepdims=True), x.shape).copy()


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W of (C, H, W), reflect borders."""
    return ndimage.gaussian_filter(x, sigma=(0.0, sigma, sigma), mode="reflect", truncate=3.0)


def make_view(image: np.ndarray, rng: np.random.Generator, *, size: int, normalizer,
              params: AugmentParams, crop_only: bool = False, blur_prob: float = 0.0,
              quantile_bounds: np.ndarray | None = None) -> np.ndarray:
    """One view (size, size, C) float32 from a raw (C, H, W) image.

    Random resized crop of the raw image, normalisation of the cropped region,
    bilinear resize; then, unless ``crop_only``: jitter, grayscale, blur, flip
    with the probabilities of ``params``.
    """
    _, h, w = image.shape
    top, left, ch, cw = sample_crop_box(rng, h, w, params.crop_scale, params.crop_ratio)
    # Normalising only the crop is exact (the presets are per pixel) and cheaper.
    region = normalizer(image[:, top:top + ch, left:left + cw], quantile_bounds)
    x = resize_bilinear(region, (size, size))
    if not crop_only:
        if rng.random() < params.jitter_prob:
            x = color_jitter(x, rng, params.brightness, params.contrast,
                             params.per_band_jitter, normalizer.output_range)
        if rng.random() < params.grayscale_prob:
            x = grayscale(x)
        if rng.random() < blur_prob:
            x = gaussian_blur(x, float(rng.uniform(*params.blur_sigma)))
        if rng.random() < params.hflip_prob:
            x = hflip(x)
    return np.ascontiguousarray(x.transpose(1, 2, 0))
