"""Multispectral augmentations on whole (H, W, C) float32 arrays, any band count.

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
    """Bilinear resize of (H, W, C) to (*size, C), float32, torch coordinates.

    Channels-last so both gathers move contiguous blocks (rows, then pixels).
    """
    x = np.asarray(x, np.float32)
    y0, y1, wy = _bilinear_coords(x.shape[0], size[0])
    x0, x1, wx = _bilinear_coords(x.shape[1], size[1])
    rows = x[y0]
    d = x[y1]
    d -= rows
    d *= wy[:, None, None]
    rows += d  # (S0, W, C)
    out = rows[:, x0]
    d = rows[:, x1]
    d -= out
    d *= wx[None, :, None]
    out += d
    return out


def hflip(x: np.ndarray) -> np.ndarray:
    """Horizontal flip of (H, W, C)."""
    return x[:, ::-1]


def _band_means(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).sum(axis=0) / (x.shape[0] * x.shape[1])


def _clip(x: np.ndarray, value_range) -> np.ndarray:
    lo, hi = value_range
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    if lo.size > 1 and np.all(lo == lo.flat[0]) and np.all(hi == hi.flat[0]):
        lo, hi = lo.flat[0], hi.flat[0]  # scalar clip is much faster
    return np.clip(x, lo, hi, out=x)


def color_jitter(x: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                 per_band: bool = True, value_range: tuple | None = None) -> np.ndarray:
    """Brightness (scale) and contrast (blend with the mean) in random order, (H, W, C).

    Factors are drawn per band (``per_band``) or shared; the result is clamped
    to ``value_range`` (per-band or scalar low/high) when given.
    """
    c = x.shape[-1]
    n = c if per_band else 1
    x = np.array(x, np.float32)  # private copy, modified in place below
    for op in rng.permutation(2):
        if op == 0 and brightness > 0:
            x *= rng.uniform(max(0.0, 1 - brightness), 1 + brightness, n).astype(np.float32)
        elif op == 1 and contrast > 0:
            f = rng.uniform(max(0.0, 1 - contrast), 1 + contrast, n).astype(np.float32)
            mean = _band_means(x) if per_band else np.float32(x.mean())
            x *= f
            x += (1 - f) * mean  # (x - mean) * f + mean
        if value_range is not None:
            _clip(x, value_range)
    return x


def grayscale(x: np.ndarray) -> np.ndarray:
    """Every band replaced by the mean over bands, (H, W, C)."""
    return np.repeat(x.mean(axis=-1, keepdims=True, dtype=np.float32), x.shape[-1], axis=-1)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W of (H, W, C), reflect borders, 3 sigma."""
    out = np.empty(x.shape, np.float32)
    ndimage.gaussian_filter1d(x, sigma, axis=0, mode="reflect", truncate=3.0, output=out)
    ndimage.gaussian_filter1d(out, sigma, axis=1, mode="reflect", truncate=3.0, output=out)
    return out


def make_view(image: np.ndarray, rng: np.random.Generator, *, size: int, normalizer,
              params: AugmentParams, crop_only: bool = False, blur_prob: float = 0.0,
              quantile_bounds: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
    """One view (size, size, C) of ``dtype`` from a raw (C, H, W) record image.

    Random resized crop of the raw image, normalisation of the cropped region,
    bilinear resize; then, unless ``crop_only``: jitter, grayscale, blur, flip
    with the probabilities of ``params``. All in float32; the cast to ``dtype`` (e.g.
    bfloat16, half the bytes to copy) is part of the final contiguous copy.
    """
    _, h, w = image.shape
    top, left, ch, cw = sample_crop_box(rng, h, w, params.crop_scale, params.crop_ratio)
    # Normalising only the crop is exact (the presets are per pixel) and cheaper;
    # the transpose to channels-last happens in the same pass.
    region = normalizer(image[:, top:top + ch, left:left + cw].transpose(1, 2, 0),
                        quantile_bounds)
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
    return np.ascontiguousarray(x, dtype=dtype)
