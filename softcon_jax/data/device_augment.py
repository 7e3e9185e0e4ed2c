"""The augmentations of ``augment.make_view`` on the accelerator (``augment_on='device'``).

The host draws every random parameter of a view with ``augment.draw_view`` (the same
per-sample ``np.random.Generator``, the same order as the host path) and ``pack`` turns the
draw into fixed-shape arrays; the raw season image travels in its stored dtype. ``view``
then applies, for one sample, in ``jax.numpy``, exactly what ``augment.apply_view`` applies
on the host: the normaliser's unit stage (per-image quantile clip, uint8 quantisation), the
random resized crop as a bilinear gather in torch's ``align_corners=False`` coordinates,
colour jitter (its order a ``lax.switch`` when random), grayscale, the Gaussian blur (the
kernel is computed on the host, as SciPy's, and applied separably with reflect borders),
the flip and the final standardisation. Equal to the host views to float32 rounding
(``tests/test_device_augment.py``). Static choices (which ops are on, crop-first or
augment-first) come from ``AugmentParams``, so a disabled op costs nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softcon_jax.data import augment

_JITTER_OPS = ("brightness", "contrast", "saturation")


def blur_radius(params: augment.AugmentParams) -> int:
    """Largest kernel radius SciPy uses for the sigma range (``int(3 sigma + 0.5)``)."""
    return int(3.0 * float(max(params.blur_sigma)) + 0.5)


def blur_kernel(sigma: float | None, radius: int) -> np.ndarray:
    """SciPy's ``gaussian_filter1d`` weights (truncate 3) zero-padded to ``2 radius + 1``;
    a unit impulse when ``sigma`` is None (no blur)."""
    k = np.zeros(2 * radius + 1, np.float64)
    if sigma is None:
        k[radius] = 1.0
        return k.astype(np.float32)
    r = int(3.0 * float(sigma) + 0.5)
    x = np.arange(-r, r + 1)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x ** 2)
    k[radius - r:radius + r + 1] = phi / phi.sum()
    return k.astype(np.float32)


def pack(draw: dict, params: augment.AugmentParams, channels: int, *,
         crop_only: bool) -> dict:
    """``augment.draw_view``'s dict -> fixed-shape numpy arrays (one sample, one view)."""
    out = {"crop": np.asarray(draw["crop"], np.int32)}
    if crop_only:
        return out
    jit = draw.get("jitter", {})
    factors = np.ones((3, channels), np.float32)
    for i, name in enumerate(_JITTER_OPS):
        if name in jit:
            factors[i] = np.broadcast_to(np.asarray(jit[name], np.float32), (channels,))
    order = [("brightness", "contrast", "saturation", "hue").index(o)
             for o in jit.get("order", ("brightness", "contrast", "saturation", "hue"))]
    out.update(
        flags=np.array([bool(jit), bool(draw.get("grayscale")), bool(draw.get("hflip"))],
                       np.float32),
        order=np.asarray(order, np.int32), factors=factors,
        hue=np.float32(jit.get("hue", 0.0)),
        blur=blur_kernel(draw.get("blur_sigma"), blur_radius(params)))
    return out


def packed_spec(params: augment.AugmentParams, channels: int, *, crop_only: bool) -> dict:
    """{key: (shape, dtype)} of ``pack``'s output."""
    spec = {"crop": ((4,), np.int32)}
    if not crop_only:
        spec.update(flags=((3,), np.float32), order=((4,), np.int32),
                    factors=((3, channels), np.float32), hue=((), np.float32),
                    blur=((2 * blur_radius(params) + 1,), np.float32))
    return spec


def quantize_thresholds(normalizer) -> np.ndarray:
    """(C, 255) float32 ``T`` with ``floor(clip(f(x), 0, 255)) = sum_j [x >= T[:, j]]`` for
    every float32 ``x``, where ``f`` is the host's float64 ``(x - lo) / (hi - lo) * 255``.

    Exact: ``f`` is monotone, and ``T[c, j]`` is the least float32 with ``f >= j + 1``.
    """
    lo, hi = normalizer.low[:, None], normalizer.high[:, None]
    j = np.arange(1, 256, dtype=np.float64)[None]

    def f(x):
        return (x.astype(np.float64) - lo) / (hi - lo) * 255.0

    t = np.broadcast_to((lo + j * (hi - lo) / 255.0).astype(np.float32), (lo.size, 255))
    t = t.copy()
    for _ in range(4):  # a few ulps at most
        up = f(t) < j
        t = np.where(up, np.nextafter(t, np.float32(np.inf)), t)
        down = f(np.nextafter(t, np.float32(-np.inf))) >= j
        t = np.where(down & ~up, np.nextafter(t, np.float32(-np.inf)), t)
    return t.astype(np.float32)


# --- one sample, channels-last float32 (H, W, C) ----------------------------------------

def _unit(img: jax.Array, normalizer, thresholds) -> jax.Array:
    """``Normalizer.unit`` of a raw (C, H, W) image, returned channels-last."""
    x = jnp.transpose(img, (1, 2, 0)).astype(jnp.float32)
    if normalizer.image_quantiles is not None:  # per-image, per-band clip (S1)
        q = jnp.percentile(jnp.reshape(x, (-1, x.shape[-1])),
                           jnp.asarray(normalizer.image_quantiles, jnp.float32), axis=0)
        x = jnp.clip(x, q[0], q[1])
    if normalizer.quantize:
        level = jnp.sum(x[..., None] >= jnp.asarray(thresholds), axis=-1, dtype=jnp.int32)
        return level.astype(jnp.float32) / jnp.float32(255.0)
    x = x * jnp.asarray(normalizer.a) + jnp.asarray(normalizer.b)
    return jnp.clip(x, 0.0, 1.0) if normalizer.clip else x


def _coords(start, n_in, n_out: int):
    src = (jnp.arange(n_out, dtype=jnp.float32) + 0.5) * (n_in.astype(jnp.float32) / n_out)
    src = jnp.maximum(src - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
    return start + i0, start + jnp.minimum(i0 + 1, n_in - 1), src - i0.astype(jnp.float32)


def crop_resize(x: jax.Array, crop: jax.Array, size: int) -> jax.Array:
    """``resize_bilinear(x[top:top + h, left:left + w], (size, size))`` for a traced crop."""
    y0, y1, wy = _coords(crop[0], crop[2], size)
    x0, x1, wx = _coords(crop[1], crop[3], size)
    rows = jnp.take(x, y0, axis=0)
    rows = rows + (jnp.take(x, y1, axis=0) - rows) * wy[:, None, None]
    out = jnp.take(rows, x0, axis=1)
    return out + (jnp.take(rows, x1, axis=1) - out) * wx[None, :, None]


def _luminance(x, w):
    return x[..., 0:1] * w[0] + x[..., 1:2] * w[1] + x[..., 2:3] * w[2]


def _rgb_to_hsv(x):
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = jnp.maximum(jnp.maximum(r, g), b)
    c = v - jnp.minimum(jnp.minimum(r, g), b)
    s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
    sc = jnp.where(c > 0, c, 1.0)
    h = jnp.where(v == r, (g - b) / sc, jnp.where(v == g, 2.0 + (b - r) / sc,
                                                  4.0 + (r - g) / sc))
    h = jnp.where(c > 0, jnp.mod(h / 6.0, 1.0), 0.0)
    return h, s, v


def _hsv_to_rgb(h, s, v):
    h6 = h * 6.0
    i = jnp.floor(h6)
    f = h6 - i
    i = jnp.mod(i.astype(jnp.int32), 6)
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)

    def pick(*vals):
        return jnp.select([i == k for k in range(5)], list(vals[:5]), vals[5])

    return jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p),
                      pick(p, p, t, v, v, q)], axis=-1)


def _jitter(x, d, params: augment.AugmentParams, value_range):
    w = [np.float32(v) for v in params.luma_weights]

    def clip(y):
        return y if value_range is None else jnp.clip(y, *value_range)

    def brightness(y):
        return clip(y * d["factors"][0])

    def contrast(y):
        f = d["factors"][1]
        mean = (jnp.mean(_luminance(y, w)) if params.rgb else jnp.mean(y, axis=(0, 1)))
        return clip(y * f + (1 - f) * mean)

    def saturation(y):
        f = d["factors"][2]
        grey = _luminance(y, w) if params.rgb else jnp.mean(y, axis=-1, keepdims=True)
        return clip(y * f + (1 - f) * grey)

    def hue(y):
        h, s, v = _rgb_to_hsv(y)
        return _hsv_to_rgb(jnp.mod(h + d["hue"], 1.0), s, v)

    ops = [fn if float(getattr(params, name)) > 0 else (lambda y: y)
           for name, fn in zip(("brightness", "contrast", "saturation", "hue"),
                               (brightness, contrast, saturation, hue))]
    if params.jitter_order == "fixed":
        for fn in ops:
            x = fn(x)
        return x
    for k in range(4):
        x = jax.lax.switch(d["order"][k], ops, x)
    return x


def _blur(x, kernel, radius: int):
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        xp = jnp.pad(x, pad, mode="symmetric")  # SciPy's 'reflect'
        n = x.shape[axis]
        x = sum(kernel[k] * jax.lax.slice_in_dim(xp, k, k + n, axis=axis)
                for k in range(2 * radius + 1))
    return x


def _augment(x, d, params: augment.AugmentParams, blur_prob: float, value_range):
    if params.jitter_prob > 0:
        x = jnp.where(d["flags"][0] > 0, _jitter(x, d, params, value_range), x)
    if params.grayscale_prob > 0:
        g = (_luminance(x, [np.float32(v) for v in params.luma_weights]) if params.rgb
             else jnp.mean(x, axis=-1, keepdims=True))
        x = jnp.where(d["flags"][1] > 0, jnp.broadcast_to(g, x.shape), x)
    if blur_prob > 0:
        x = _blur(x, d["blur"], blur_radius(params))
    if params.hflip_prob > 0:
        x = jnp.where(d["flags"][2] > 0, x[:, ::-1], x)
    return x


def view(img: jax.Array, d: dict, *, size: int, normalizer, params: augment.AugmentParams,
         crop_only: bool = False, blur_prob: float = 0.0, dtype=jnp.float32,
         thresholds: np.ndarray | None = None) -> jax.Array:
    """One view (size, size, C) of a raw (C, H, W) image and its ``pack``-ed draw."""
    x = _unit(img, normalizer, thresholds)
    value_range = normalizer.unit_range
    if params.augment_before_crop and not crop_only:
        x = crop_resize(_augment(x, d, params, blur_prob, value_range), d["crop"], size)
    else:
        x = crop_resize(x, d["crop"], size)
        if not crop_only:
            x = _augment(x, d, params, blur_prob, value_range)
    if normalizer.clip and (np.any(normalizer.c != 1) or np.any(normalizer.d != 0)):
        x = x * jnp.asarray(normalizer.c) + jnp.asarray(normalizer.d)
    return x.astype(dtype)


def batch_view(images: jax.Array, draws: dict, **kw) -> jax.Array:
    """``view`` over a batch: (B, C, H, W) images, draws with a leading B."""
    return jax.vmap(lambda i, d: view(i, d, **kw))(images, draws)

