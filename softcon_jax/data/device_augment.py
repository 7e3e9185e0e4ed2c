"""The augmentations of ``augment.make_view`` on the accelerator (``augment_on='device'``).

The host draws every random parameter of a view with ``augment.draw_view`` (the same
per-sample ``np.random.Generator``, the same order as the host path) and ``pack`` turns the
draw into fixed-shape arrays; the raw season image travels in its stored dtype. ``view``
then applies, for one sample, in ``jax.numpy``, exactly what ``augment.apply_view`` applies
on the host: the normaliser's unit stage (per-image quantile clip, uint8 quantisation), the
random resized crop, colour jitter (in a random order: hue once, between the blends drawn
before and after it), grayscale, the Gaussian blur (the kernel is computed on the host, as
SciPy's, and applied separably with reflect borders), the flip and the final
standardisation. Equal to the host views to float32 rounding
(``tests/test_device_augment.py``, ``tests/test_device_crop.py``). Static choices (which ops
are on, crop-first or augment-first) come from ``AugmentParams``, so a disabled op costs
nothing.

Written for a TPU's cost model: no gathers, scatters or dynamic slices (XLA:TPU charges a
gather several times the bytes it moves). The crop and the bilinear resize are two float32
matmuls with interpolation matrices built from the traced box (rows, then columns;
``precision=HIGHEST``, else the MXU rounds the image to bfloat16); the flip reverses the
column matrix instead of the image; the image stays channels-first (C, H, W) until the end,
so 13 bands never sit in the 128-lane minor dimension; a random jitter order selects each
blend's factor and operand instead of switching between ops (under vmap a switch computes
every branch). For SoftCon's ViT-S/14 step on a v5e slice this cut XLA's bytes accessed for
the views from ~41 to ~6 GiB per chip and step (BENCHMARKS.md, "Device augmentation in the
compiled pod step").
"""

from __future__ import annotations

import functools

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


# --- one sample, channels-first float32 (C, H, W) ----------------------------------------
# Channels-first keeps the long image axes in the TPU's (8, 128) tiles; a 13-band array with
# the bands last pads 13 -> 128 lanes (~10x the bytes). The view turns channels-last at the
# very end, as the model takes it.

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls on the MXU (bf16 passes otherwise)


def _unit(img: jax.Array, normalizer, thresholds) -> jax.Array:
    """``Normalizer.unit`` of a raw (C, H, W) image, float32, still (C, H, W)."""
    x = img.astype(jnp.float32)
    if normalizer.image_quantiles is not None:  # per-image, per-band clip (S1)
        q = jnp.percentile(jnp.reshape(x, (x.shape[0], -1)),
                           jnp.asarray(normalizer.image_quantiles, jnp.float32), axis=1)
        x = jnp.clip(x, q[0][:, None, None], q[1][:, None, None])
    if normalizer.quantize:
        level = jnp.sum(x[..., None] >= jnp.asarray(thresholds)[:, None, None],
                        axis=-1, dtype=jnp.int32)
        return level.astype(jnp.float32) / jnp.float32(255.0)
    x = x * _per_band(normalizer.a) + _per_band(normalizer.b)
    return jnp.clip(x, 0.0, 1.0) if normalizer.clip else x


def _per_band(v) -> jax.Array:
    """A per-band vector (or scalar) broadcast against (C, H, W)."""
    v = jnp.asarray(v, jnp.float32)
    return v[:, None, None] if v.ndim else v


def interpolation_matrix(start, length, n_in: int, n_out: int) -> jax.Array:
    """(n_out, n_in) float32 ``M`` with ``M @ v`` = ``v[start:start + length]`` resized to
    ``n_out`` samples, bilinear in torch's ``align_corners=False`` coordinates (source
    ``(i + 0.5) * length / n_out - 0.5`` clamped at 0, as ``augment.resize_bilinear`` and
    ``jax.image.scale_and_translate``). Each row holds the two weights ``1 - f`` and ``f``
    of its neighbours (one weight 1 at the last pixel). ``start``, ``length`` may be traced.
    """
    # Exact in integers: source = ((2 i + 1) length - n_out) / (2 n_out), so the neighbour
    # index and the fraction carry no float32 rounding (float32 sources lose ~1e-6 at 264).
    length = jnp.asarray(length, jnp.int32)
    num = jnp.maximum((2 * jnp.arange(n_out, dtype=jnp.int32) + 1) * length - n_out, 0)
    i0 = jnp.minimum(num // (2 * n_out), length - 1)
    i1 = jnp.minimum(i0 + 1, length - 1)
    f = ((num - i0 * (2 * n_out)).astype(jnp.float32) / np.float32(2 * n_out))[:, None]
    pos = jnp.arange(n_in, dtype=jnp.int32)[None, :]
    return (jnp.where(pos == (start + i0)[:, None], 1.0 - f, 0.0)
            + jnp.where(pos == (start + i1)[:, None], f, 0.0))


def blur_matrix(kernel: jax.Array, radius: int, n: int) -> jax.Array:
    """(n, n) ``B`` with ``B @ v`` = ``v`` correlated with ``kernel`` (2 radius + 1 taps)
    with SciPy's 'reflect' borders (``d c b a | a b c d | d c b a``)."""
    i = np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None]
    i = np.where(i < 0, -i - 1, np.where(i >= n, 2 * n - 1 - i, i))  # (n, taps), static
    pos = np.arange(n)
    return sum(jnp.where(pos[None] == i[:, k:k + 1], kernel[k], 0.0)
               for k in range(2 * radius + 1))


def crop_resize(x: jax.Array, crop: jax.Array, size: int, mirror=None,
                mirror_input: bool = False, blur=None) -> jax.Array:
    """``resize_bilinear(x[:, top:top + h, left:left + w], (size, size))`` of a (C, H, W)
    image for a traced ``crop`` (top, left, h, w): two matmuls with interpolation matrices
    (rows, then columns), no gather. ``mirror`` (traced bool) flips the columns of the
    result, or with ``mirror_input`` those of ``x`` before the crop, at no cost: the column
    matrix reversed along its output or input axis. ``blur`` (kernel, radius) blurs ``x``
    before the crop (``_blur``) inside the same two matmuls: both are linear and separable,
    so the interpolation matrices times the blur matrices do both."""
    my = interpolation_matrix(crop[0], crop[2], x.shape[1], size)
    mx = interpolation_matrix(crop[1], crop[3], x.shape[2], size)
    if blur is not None:
        my = jnp.matmul(my, blur_matrix(*blur, x.shape[1]), precision=_HIGHEST)
        mx = jnp.matmul(mx, blur_matrix(*blur, x.shape[2]), precision=_HIGHEST)
    if mirror is not None:
        mx = jnp.where(mirror, mx[:, ::-1] if mirror_input else mx[::-1], mx)
    rows = jnp.einsum("sh,chw->csw", my, x, precision=_HIGHEST)
    return jnp.einsum("csw,tw->cst", rows, mx, precision=_HIGHEST)


def _luminance(x, w):
    return x[0:1] * w[0] + x[1:2] * w[1] + x[2:3] * w[2]


def _rgb_to_hsv(x):
    r, g, b = x[0], x[1], x[2]
    v = jnp.maximum(jnp.maximum(r, g), b)
    c = v - jnp.minimum(jnp.minimum(r, g), b)
    s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
    sc = jnp.where(c > 0, c, 1.0)
    # The sector from comparisons between the channels, as ``v == r`` on the host: XLA may
    # compute a fused channel twice (once contracted into an FMA), so ``v == r`` can fail
    # for the channel that is the maximum; the hue is continuous at ties either way.
    h = jnp.where((r >= g) & (r >= b), (g - b) / sc,
                  jnp.where(g >= b, 2.0 + (b - r) / sc, 4.0 + (r - g) / sc))
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
                      pick(p, p, t, v, v, q)], axis=0)


def _jitter(x, d, params: augment.AugmentParams, value_range):
    w = [np.float32(v) for v in params.luma_weights]

    def clip(y):
        return y if value_range is None else jnp.clip(y, *value_range)

    def brightness(y):
        return clip(y * _per_band(d["factors"][0]))

    def contrast(y):
        f = _per_band(d["factors"][1])
        mean = (jnp.mean(_luminance(y, w)) if params.rgb
                else jnp.mean(y, axis=(1, 2), keepdims=True))
        return clip(y * f + (1 - f) * mean)

    def saturation(y):
        f = _per_band(d["factors"][2])
        grey = _luminance(y, w) if params.rgb else jnp.mean(y, axis=0, keepdims=True)
        return clip(y * f + (1 - f) * grey)

    def hue(y):
        h, s, v = _rgb_to_hsv(y)
        return _hsv_to_rgb(jnp.mod(h + d["hue"], 1.0), s, v)

    names = ("brightness", "contrast", "saturation", "hue")
    enabled = [float(getattr(params, name)) > 0 for name in names]
    ops = [fn if on else (lambda y: y)
           for on, fn in zip(enabled, (brightness, contrast, saturation, hue))]
    if params.jitter_order == "fixed":
        for fn in ops:
            x = fn(x)
        return x

    def blend(y, op):
        """Brightness, contrast or saturation (``op`` 0, 1, 2) as the one expression
        they share, ``clip(y f + (1 - f) m)`` with ``m`` = 0, the mean, the grey image."""
        f = _per_band(jnp.where(op == 0, d["factors"][0],
                                jnp.where(op == 1, d["factors"][1], d["factors"][2])))
        grey = _luminance(y, w) if params.rgb else jnp.mean(y, axis=0, keepdims=True)
        mean = jnp.mean(grey) if params.rgb else jnp.mean(y, axis=(1, 2), keepdims=True)
        m = jnp.where(op == 1, mean, jnp.where(op == 2, grey, 0.0))
        on = functools.reduce(jnp.logical_or, [op == i for i in range(3) if enabled[i]],
                              jnp.bool_(False))
        return jnp.where(on, clip(y * f + (1 - f) * m), y)

    # A random order without a switch per position: under vmap a switch computes every
    # branch and selects one, which made the HSV round trip four times per view (most of
    # SeCo's view cost). Hue is drawn once: the blends drawn before it, hue, the ones after.
    hue_at = sum(k * (d["order"][k] == 3) for k in range(4))
    for k in range(3):  # positions before hue's (never the last)
        x = jnp.where(k < hue_at, blend(x, d["order"][k]), x)
    x = ops[3](x)
    for k in range(1, 4):  # positions after hue's (never the first)
        x = jnp.where(k > hue_at, blend(x, d["order"][k]), x)
    return x


def _blur(x, kernel, radius: int):
    """SciPy's separable Gaussian (reflect borders) over the two image axes of (C, H, W)."""
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        xp = jnp.pad(x, pad, mode="symmetric")  # SciPy's 'reflect'
        n = x.shape[axis]
        x = sum(kernel[k] * jax.lax.slice_in_dim(xp, k, k + n, axis=axis)
                for k in range(2 * radius + 1))
    return x


def _augment(x, d, params: augment.AugmentParams, blur_prob: float, value_range):
    """Jitter, grayscale and blur (none when ``blur_prob`` is 0) of (C, H, W); the flip is
    the crop's (``crop_resize``): it commutes with all three (per-pixel ops, global means, a
    symmetric kernel)."""
    if params.jitter_prob > 0:
        x = jnp.where(d["flags"][0] > 0, _jitter(x, d, params, value_range), x)
    if params.grayscale_prob > 0:
        g = (_luminance(x, [np.float32(v) for v in params.luma_weights]) if params.rgb
             else jnp.mean(x, axis=0, keepdims=True))
        x = jnp.where(d["flags"][1] > 0, jnp.broadcast_to(g, x.shape), x)
    if blur_prob > 0:
        x = _blur(x, d["blur"], blur_radius(params))
    return x


def view(img: jax.Array, d: dict, *, size: int, normalizer, params: augment.AugmentParams,
         crop_only: bool = False, blur_prob: float = 0.0, dtype=jnp.float32,
         thresholds: np.ndarray | None = None) -> jax.Array:
    """One view (size, size, C) of a raw (C, H, W) image and its ``pack``-ed draw."""
    x = _unit(img, normalizer, thresholds)
    value_range = normalizer.unit_range
    mirror = d["flags"][2] > 0 if params.hflip_prob > 0 and not crop_only else None
    if params.augment_before_crop and not crop_only:
        # The whole-image blur rides in the crop's matmuls.
        blur = (d["blur"], blur_radius(params)) if blur_prob > 0 else None
        x = crop_resize(_augment(x, d, params, 0.0, value_range), d["crop"], size,
                        mirror, mirror_input=True, blur=blur)
    else:
        x = crop_resize(x, d["crop"], size, mirror)
        if not crop_only:
            x = _augment(x, d, params, blur_prob, value_range)
    if normalizer.clip and (np.any(normalizer.c != 1) or np.any(normalizer.d != 0)):
        x = x * _per_band(normalizer.c) + _per_band(normalizer.d)
    return jnp.transpose(x, (1, 2, 0)).astype(dtype)


def batch_view(images: jax.Array, draws: dict, **kw) -> jax.Array:
    """``view`` over a batch: (B, C, H, W) images, draws with a leading B."""
    return jax.vmap(lambda i, d: view(i, d, **kw))(images, draws)

