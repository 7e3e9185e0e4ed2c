"""Multispectral augmentations on whole (H, W, C) float32 arrays, any band count.

Vectorised NumPy / SciPy re-implementations of the torchvision transforms the
reference methods use, generalised from RGB to C bands:

- ``sample_crop_box``: ``RandomResizedCrop.get_params`` (10 tries, then a
  centre crop with the ratio clamped);
- ``resize_bilinear``: bilinear resize with torch's ``align_corners=False``
  (``F.interpolate(..., antialias=False)``) coordinates;
- ``jitter``: colour jitter. On RGB input (``AugmentParams.rgb``) it is torchvision's
  ``ColorJitter(brightness, contrast, saturation, hue)`` on float images in [0, 1]:
  one factor per op for all channels, the ops in a random order, contrast and saturation
  blended with the luminance (``luma_weights``), hue rotated in HSV, each op clamped to
  [0, 1]. On other band sets: brightness (scale), contrast (blend with each band's mean)
  and saturation (blend with the band mean), factors per band or shared, clamped to the
  normaliser's unit range when it has one (hue needs RGB);
- ``grayscale``: RGB: the luminance ``0.299 R + 0.587 G + 0.114 B`` in every channel
  (``RandomGrayscale``; PIL's ``convert('L')`` weights, which the official SeCo applies
  to its PIL images); other band sets: every band replaced by the band mean (SSL4EO-S12's
  ``ToGray``);
- ``gaussian_blur``: separable Gaussian, sigma drawn from a range;
- ``hflip``.

``make_view`` runs them where torchvision does: on the image in [0, 1] (the normaliser's
unit stage, ``Normalizer.unit``), before any final standardisation
(``Normalizer.finish``, e.g. SeCo's ImageNet mean/std). With ``augment_before_crop``
(SeCo: ``augment`` then ``RandomResizedCrop`` in ``datasets/seco_dataset.py``) the colour
ops, blur and flip see the whole image and the crop comes last; otherwise the crop comes
first (MoCo-v3: ``RandomResizedCrop`` first).

All randomness comes from the ``np.random.Generator`` passed in (one per sample).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from softcon_jax.cli import UserValueError

# ITU-R 601-2 luma, PIL's Image.convert('L') (torchvision's tensor ops use 0.2989 for R).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
JITTER_ORDERS = ("random", "fixed")
_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges; ``blur_prob`` is per view (view i uses item i % len)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0
    per_band_jitter: bool = True      # band sets only; RGB jitter shares one factor
    jitter_order: str = "random"      # 'random' (torchvision) | 'fixed' (b, c, s, h)
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, ...] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    rgb: bool = False                 # channels are R, G, B: torchvision colour ops
    luma_weights: tuple[float, float, float] = LUMA_WEIGHTS
    augment_before_crop: bool = False  # SeCo: colour/blur/flip on the whole image, then crop

    def __post_init__(self):
        if self.jitter_order not in JITTER_ORDERS:
            raise UserValueError(f"data_config.augment.jitter_order={self.jitter_order!r}: "
                                 f"expected one of {JITTER_ORDERS}")
        if self.hue and not self.rgb:
            raise UserValueError(f"data_config.augment.hue={self.hue} needs RGB input (bands "
                                 f"B4, B3, B2, or data_config.augment.rgb=True); set "
                                 f"data_config.augment.hue=0 for other band sets")
        if not 0 <= self.hue <= 0.5:
            raise UserValueError(f"data_config.augment.hue={self.hue}: expected 0 <= hue <= 0.5")


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


def luminance(x: np.ndarray, weights=LUMA_WEIGHTS) -> np.ndarray:
    """(H, W, 1) weighted sum of the R, G, B channels of (H, W, 3), float32."""
    if x.shape[-1] != 3:
        raise UserValueError(f"luminance needs 3 channels (R, G, B), got {x.shape[-1]}")
    w = np.asarray(weights, np.float32)
    return (x[..., 0:1] * w[0] + x[..., 1:2] * w[1] + x[..., 2:3] * w[2]).astype(np.float32)


def grayscale(x: np.ndarray, weights=None) -> np.ndarray:
    """(H, W, C) grey image: every band replaced by the mean over bands, or, with RGB
    ``weights`` (e.g. ``LUMA_WEIGHTS``), by the luminance of (H, W, 3)."""
    g = (x.mean(axis=-1, keepdims=True, dtype=np.float32) if weights is None
         else luminance(x, weights))
    return np.repeat(g, x.shape[-1], axis=-1)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> (..., 3) HSV, hue in [0, 1) (the hexcone model)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    c = v - np.minimum(np.minimum(r, g), b)
    safe_v = np.where(v > 0, v, 1.0)
    safe_c = np.where(c > 0, c, 1.0)
    s = np.where(v > 0, c / safe_v, 0.0)
    h = np.where(v == r, (g - b) / safe_c,
                 np.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
    h = np.where(c > 0, np.mod(h / 6.0, 1.0), 0.0)
    return np.stack([h, s, v], axis=-1).astype(x.dtype)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb_to_hsv``."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h6 = h * 6.0
    i = np.floor(h6)
    f = h6 - i
    i = i.astype(np.int64) % 6
    p = np.clip(v * (1.0 - s), 0.0, 1.0)
    q = np.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = np.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(hsv.dtype)


def adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotates the hue of (H, W, 3) RGB in [0, 1] by ``shift`` turns (|shift| <= 0.5)."""
    hsv = rgb_to_hsv(x)
    hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(shift), 1.0)
    return hsv_to_rgb(hsv)


def draw_jitter(rng: np.random.Generator, params: "AugmentParams", channels: int) -> dict:
    """The random part of one colour jitter: op order and factors.

    As torchvision ``ColorJitter.get_params``: the order (a permutation of brightness,
    contrast, saturation, hue, or that fixed order), then a factor per enabled op, uniform
    in [max(0, 1 - s), 1 + s] (hue: [-h, h]). Factors are (C,) arrays for band sets with
    ``per_band_jitter``, else floats.
    """
    order = (rng.permutation(4) if params.jitter_order == "random" else np.arange(4))
    n = channels if (params.per_band_jitter and not params.rgb) else None
    draw = {"order": [_OPS[i] for i in order]}
    for name in ("brightness", "contrast", "saturation"):
        s = float(getattr(params, name))
        if s > 0:
            f = rng.uniform(max(0.0, 1 - s), 1 + s, n)
            draw[name] = f.astype(np.float32) if n else float(f)
    if params.hue > 0:
        draw["hue"] = float(rng.uniform(-params.hue, params.hue))
    return draw


def apply_jitter(x: np.ndarray, draw: dict, *, rgb: bool, luma_weights=LUMA_WEIGHTS,
                 value_range: tuple | None = (0.0, 1.0)) -> np.ndarray:
    """Applies a ``draw_jitter`` draw to (H, W, C); a new float32 array.

    RGB: torchvision's functional ops on float images (``adjust_brightness``: x f;
    ``adjust_contrast``: blend with the mean luminance; ``adjust_saturation``: blend with
    the luminance image; ``adjust_hue``), clamped to ``value_range`` after each blend.
    Band sets: brightness x f, contrast blended with each band's mean (SSL4EO-S12's
    ``RandomContrast``), saturation blended with the band-mean grey image.
    """
    x = np.array(x, np.float32)  # private copy, modified in place below
    for op in draw["order"]:
        if op not in draw:
            continue
        f = draw[op]
        if op == "hue":
            x = adjust_hue(x, f)
            continue
        f = np.asarray(f, np.float32)
        if op == "brightness":
            x *= f
        elif op == "contrast":
            mean = (luminance(x, luma_weights).mean(dtype=np.float32) if rgb
                    else _band_means(x))
            x *= f
            x += (1 - f) * mean  # (x - mean) * f + mean
        else:  # saturation
            grey = (luminance(x, luma_weights) if rgb
                    else x.mean(axis=-1, keepdims=True, dtype=np.float32))
            x *= f
            x += (1 - f) * grey
        if value_range is not None:
            _clip(x, value_range)
    return x


def jitter(x: np.ndarray, rng: np.random.Generator, params: "AugmentParams",
           value_range: tuple | None = (0.0, 1.0), trace: dict | None = None) -> np.ndarray:
    """``draw_jitter`` then ``apply_jitter``; the draw is stored in ``trace['jitter']``."""
    draw = draw_jitter(rng, params, x.shape[-1])
    if trace is not None:
        trace["jitter"] = draw
    return apply_jitter(x, draw, rgb=params.rgb, luma_weights=params.luma_weights,
                        value_range=value_range)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W of (H, W, C), reflect borders, 3 sigma."""
    out = np.empty(x.shape, np.float32)
    ndimage.gaussian_filter1d(x, sigma, axis=0, mode="reflect", truncate=3.0, output=out)
    ndimage.gaussian_filter1d(out, sigma, axis=1, mode="reflect", truncate=3.0, output=out)
    return out


def draw_augment(rng: np.random.Generator, params: AugmentParams, channels: int,
                 blur_prob: float) -> dict:
    """The random part of ``_augment`` (jitter, grayscale, blur sigma, flip), in its order.

    Absent keys = not applied. Nothing depends on pixel values, so drawing first and
    applying later (``apply_augment``, or on the device) gives the same views.
    """
    draw = {}
    if rng.random() < params.jitter_prob:
        draw["jitter"] = draw_jitter(rng, params, channels)
    if rng.random() < params.grayscale_prob:
        draw["grayscale"] = True
    if rng.random() < blur_prob:
        draw["blur_sigma"] = float(rng.uniform(*params.blur_sigma))
    if rng.random() < params.hflip_prob:
        draw["hflip"] = True
    return draw


def apply_augment(x: np.ndarray, draw: dict, params: AugmentParams,
                  value_range: tuple | None) -> np.ndarray:
    """Jitter, grayscale, blur, flip of (H, W, C) as ``draw`` (``draw_augment``) says."""
    if "jitter" in draw:
        x = apply_jitter(x, draw["jitter"], rgb=params.rgb, luma_weights=params.luma_weights,
                         value_range=value_range)
    if draw.get("grayscale"):
        x = grayscale(x, params.luma_weights if params.rgb else None)
    if "blur_sigma" in draw:
        x = gaussian_blur(x, draw["blur_sigma"])
    if draw.get("hflip"):
        x = hflip(x)
    return x


def draw_view(rng: np.random.Generator, height: int, width: int, channels: int, *,
              params: AugmentParams, crop_only: bool = False, blur_prob: float = 0.0) -> dict:
    """Every random draw of one ``make_view``, in its order: ``crop`` (top, left, h, w),
    then (unless ``crop_only``) those of ``draw_augment``."""
    draw = {"crop": sample_crop_box(rng, height, width, params.crop_scale, params.crop_ratio)}
    if not crop_only:
        draw.update(draw_augment(rng, params, channels, blur_prob))
    return draw


def make_view(image: np.ndarray, rng: np.random.Generator, *, size: int, normalizer,
              params: AugmentParams, crop_only: bool = False, blur_prob: float = 0.0,
              quantile_bounds: np.ndarray | None = None, dtype=np.float32,
              trace: dict | None = None) -> np.ndarray:
    """One view (size, size, C) of ``dtype`` from a raw (C, H, W) record image.

    Random resized crop of the raw image, the normaliser's unit stage (to [0, 1] for the
    clipping presets), bilinear resize; then, unless ``crop_only``: jitter, grayscale,
    blur, flip with the probabilities of ``params``; last the normaliser's final
    standardisation (``Normalizer.finish``; none for ``softcon``). With
    ``params.augment_before_crop`` the augmentations run on the whole image and the crop
    and resize come after them. All in float32; the cast to ``dtype`` (e.g. bfloat16, half
    the bytes to copy) is part of the final contiguous copy. ``trace``, when a dict, gets
    the random draws: ``crop`` (top, left, h, w), ``jitter`` (see ``draw_jitter``),
    ``grayscale``, ``blur_sigma``, ``hflip`` (absent = not applied).
    """
    c, h, w = image.shape
    draw = draw_view(rng, h, w, c, params=params, crop_only=crop_only, blur_prob=blur_prob)
    if trace is not None:
        trace.update(draw, size=size)
    return apply_view(image, draw, size=size, normalizer=normalizer, params=params,
                      quantile_bounds=quantile_bounds, dtype=dtype)


def apply_view(image: np.ndarray, draw: dict, *, size: int, normalizer,
               params: AugmentParams, quantile_bounds: np.ndarray | None = None,
               dtype=np.float32) -> np.ndarray:
    """The deterministic part of ``make_view``: ``draw`` (``draw_view``) applied to a raw
    (C, H, W) image."""
    top, left, ch, cw = draw["crop"]
    value_range = normalizer.unit_range
    unit = normalizer.unit
    if params.augment_before_crop and len(draw) > 1:  # crop-only: same either way
        x = unit(image.transpose(1, 2, 0), quantile_bounds)
        x = apply_augment(x, draw, params, value_range)
        x = resize_bilinear(x[top:top + ch, left:left + cw], (size, size))
    else:
        # Normalising only the crop is exact (the presets are per pixel) and cheaper;
        # the transpose to channels-last happens in the same pass.
        region = unit(image[:, top:top + ch, left:left + cw].transpose(1, 2, 0),
                      quantile_bounds)
        x = resize_bilinear(region, (size, size))
        x = apply_augment(x, draw, params, value_range)
    x = normalizer.finish(x)
    return np.ascontiguousarray(x, dtype=dtype)
