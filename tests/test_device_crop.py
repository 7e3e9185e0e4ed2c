"""Device views without gathers: the matmul crop equals the gather crop and the host crop,
and each view op, on or off, equals the host path in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softcon_jax.data import augment, device_augment, normalize

SIZE = 12


def _gather_crop_f64(x, box, size, flip=False):
    """Bilinear crop-resize of (C, H, W) by index gathers in float64 (torch's
    ``align_corners=False`` coordinates): the formulation the device used before."""
    top, left, h, w = box

    def coords(n):
        src = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n - 1)
        return i0, np.minimum(i0 + 1, n - 1), src - i0

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    c = np.asarray(x, np.float64)[:, top:top + h, left:left + w]
    rows = c[:, y0] * (1 - fy[:, None]) + c[:, y1] * fy[:, None]
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
    return out[:, :, ::-1] if flip else out


def _boxes(rng, hh, ww, n):
    """Edge cases first (whole image, corners and borders, one-pixel strips, the smallest
    and the most elongated boxes, upsampling and downsampling), then random boxes."""
    out = [(0, 0, hh, ww), (hh - 1, ww - 1, 1, 1), (0, ww - 3, hh, 3), (hh - 2, 0, 2, ww),
           (hh - 5, ww - 7, 5, 7), (0, 0, 1, ww), (3, 0, hh - 3, 1),
           (1, 2, SIZE // 2, SIZE // 3), (0, 0, min(SIZE, hh), min(SIZE, ww))]
    for _ in range(n):
        h, w = rng.integers(1, hh + 1), rng.integers(1, ww + 1)
        out.append((rng.integers(0, hh - h + 1), rng.integers(0, ww - w + 1), h, w))
    return np.asarray(out, np.int32)


@pytest.mark.parametrize("shape", [(13, 23, 17), (3, 9, 30)])
def test_matmul_crop_equals_gather_crop_and_host_crop(shape):
    rng = np.random.default_rng(0)
    x = rng.random(shape).astype(np.float32)
    boxes = _boxes(rng, shape[1], shape[2], 40)
    flips = rng.random(len(boxes)) < 0.5
    fn = jax.jit(jax.vmap(lambda b, f: device_augment.crop_resize(jnp.asarray(x), b, SIZE, f)))
    got = np.asarray(fn(boxes, flips))
    for box, flip, g in zip(boxes, flips, got):
        want = _gather_crop_f64(x, box, SIZE, flip)
        np.testing.assert_allclose(g, want, rtol=0, atol=3e-7, err_msg=str(box))
        t, l, h, w = box
        host = augment.resize_bilinear(x[:, t:t + h, l:l + w].transpose(1, 2, 0), (SIZE, SIZE))
        host = host[:, ::-1] if flip else host
        np.testing.assert_allclose(g, host.transpose(2, 0, 1), rtol=0, atol=3e-7)


def test_mirror_before_the_crop_is_the_crop_of_the_mirrored_image():
    rng = np.random.default_rng(1)
    x = rng.random((4, 15, 19)).astype(np.float32)
    for box in _boxes(rng, 15, 19, 20):
        got = device_augment.crop_resize(jnp.asarray(x), box, SIZE, jnp.asarray(True),
                                         mirror_input=True)
        want = _gather_crop_f64(x[:, :, ::-1], box, SIZE)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=3e-7)


def test_interpolation_matrix_rows_are_convex_weights():
    m = np.asarray(device_augment.interpolation_matrix(5, 7, 20, 16))
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    assert (m >= 0).all() and (m[:, :5] == 0).all() and (m[:, 12:] == 0).all()
    assert ((m > 0).sum(1) <= 2).all()


def _no_gathers_and_full_precision(fn, *args):
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    for prim in ("gather", "scatter", "dynamic_slice", "dynamic_update_slice"):
        assert f" {prim}[" not in jaxpr, prim
    dots = jaxpr.count("dot_general[")  # float32 on the MXU, not one bf16 pass
    assert dots >= 2 and jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == dots


OPS = {"none": {}, "jitter": {"jitter_prob": 1.0}, "grayscale": {"grayscale_prob": 1.0},
       "blur": {"blur": True}, "flip": {"hflip_prob": 1.0},
       "all": {"jitter_prob": 1.0, "grayscale_prob": 0.5, "blur": True, "hflip_prob": 0.5}}


def _setup(op, rgb, before_crop):
    kw = {k: v for k, v in OPS[op].items() if k != "blur"}
    extra = {"saturation": 0.4, "hue": 0.2} if rgb else {}
    params = augment.AugmentParams(
        **{"jitter_prob": 0.0, "grayscale_prob": 0.0, "hflip_prob": 0.0, **kw, **extra},
        rgb=rgb, augment_before_crop=before_crop)
    blur_prob = 1.0 if "blur" in OPS[op] else 0.0
    if rgb:
        norm = normalize.make_normalizer("seco_quantile", "seco", ["B4", "B3", "B2"])
    else:
        norm = normalize.make_normalizer("softcon", "s2c", normalize.S2C_BANDS)
    return params, blur_prob, norm


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("rgb,before_crop", [(False, False), (True, True)])
def test_each_view_op_on_or_off_equals_host(op, dtype, rgb, before_crop):
    """Crop boxes with the edge cases, the op always (or never) drawn; SoftCon-like
    13 bands cropping first, SeCo-like RGB augmenting the whole image first."""
    params, blur_prob, norm = _setup(op, rgb, before_crop)
    c, hh, ww = (3, 17, 21) if rgb else (13, 21, 17)
    rng = np.random.default_rng(sorted(OPS).index(op) + 10 * rgb)
    img = rng.integers(0, 6000 if not rgb else 255, (c, hh, ww)).astype(
        np.uint16 if not rgb else np.uint8)
    boxes = _boxes(rng, hh, ww, 7)  # 16 views: XLA:CPU vectorises the batch
    draws, packed = [], []
    for box in boxes:
        d = augment.draw_view(rng, hh, ww, c, params=params, blur_prob=blur_prob)
        d["crop"] = tuple(int(v) for v in box)
        draws.append(d)
        packed.append(device_augment.pack(d, params, c, crop_only=False))
    packed = jax.tree.map(lambda *v: np.stack(v), *packed)
    np_dtype = jnp.bfloat16 if dtype == "bfloat16" else np.float32

    def fn(images, d):
        return device_augment.batch_view(images, d, size=SIZE, normalizer=norm,
                                         params=params, blur_prob=blur_prob, dtype=np_dtype)

    images = np.broadcast_to(img, (len(boxes),) + img.shape)
    _no_gathers_and_full_precision(fn, images, packed)
    got = np.asarray(jax.jit(fn)(images, packed), np.float32)
    for d, g in zip(draws, got):
        want = augment.apply_view(img, d, size=SIZE, normalizer=norm, params=params,
                                  dtype=np_dtype).astype(np.float32)
        assert g.shape == want.shape == (SIZE, SIZE, c)
        if dtype == "bfloat16":  # float32 rounding can move a bf16 rounding by one step
            np.testing.assert_allclose(g, want, rtol=2 ** -7, atol=1e-5, err_msg=str(d))
        else:
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=2e-5, err_msg=str(d))


def test_rgb_jitter_with_hue_in_a_batch_equals_host():
    """SeCo's colour jitter (random order, hue) on 16 whole-image views under one jit: the
    hue sector must not depend on how XLA fuses and vectorises the batch."""
    params, blur_prob, norm = _setup("all", True, True)
    rng = np.random.default_rng(7)
    img = rng.integers(0, 255, (3, 17, 21)).astype(np.uint8)
    draws = [augment.draw_view(rng, 17, 21, 3, params=params, blur_prob=blur_prob)
             for _ in range(16)]
    packed = jax.tree.map(lambda *v: np.stack(v),
                          *[device_augment.pack(d, params, 3, crop_only=False) for d in draws])
    got = jax.jit(lambda i, d: device_augment.batch_view(
        i, d, size=SIZE, normalizer=norm, params=params, blur_prob=blur_prob))(
        np.broadcast_to(img, (16,) + img.shape), packed)
    for d, g in zip(draws, np.asarray(got)):
        want = augment.apply_view(img, d, size=SIZE, normalizer=norm, params=params)
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=2e-5, err_msg=str(d))


def test_blur_matrix_is_scipys_gaussian_filter():
    x = np.random.default_rng(2).random((2, 9, 14)).astype(np.float32)
    for sigma in (0.1, 0.9, 2.0):
        k = device_augment.blur_kernel(sigma, 6)
        by = np.asarray(device_augment.blur_matrix(jnp.asarray(k), 6, 9))
        bx = np.asarray(device_augment.blur_matrix(jnp.asarray(k), 6, 14))
        got = np.einsum("hi,cij,wj->chw", by, x, bx)
        want = augment.gaussian_blur(x.transpose(1, 2, 0), sigma).transpose(2, 0, 1)
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("rgb", [True, False])
def test_every_jitter_order_equals_host(rgb):
    """All 24 orders of brightness, contrast, saturation and hue in one batch: the device
    applies hue once, between the blends drawn before and after it. Band sets: hue off and
    saturation off (a disabled op is skipped wherever it is drawn), factors per band."""
    import itertools

    extra = {"saturation": 0.4, "hue": 0.2} if rgb else {"per_band_jitter": True}
    params = augment.AugmentParams(jitter_prob=1.0, grayscale_prob=0.0, hflip_prob=0.0,
                                   rgb=rgb, jitter_order="random", **extra)
    c, hh, ww = (3, 9, 11) if rgb else (13, 9, 11)
    rng = np.random.default_rng(24 + rgb)
    x = rng.uniform(0.0, 1.0, (c, hh, ww)).astype(np.float32)
    draws = []
    for order in itertools.permutations(range(4)):
        d = augment.draw_jitter(rng, params, c)
        d["order"] = [augment._OPS[i] for i in order]
        draws.append(d)
    packed = jax.tree.map(lambda *v: np.stack(v), *[device_augment.pack(
        {"crop": (0, 0, hh, ww), "jitter": d}, params, c, crop_only=False) for d in draws])
    got = jax.jit(jax.vmap(lambda y, d: device_augment._jitter(y, d, params, (0.0, 1.0))))(
        np.broadcast_to(x, (24,) + x.shape), packed)
    for d, g in zip(draws, np.asarray(got)):
        want = augment.apply_jitter(x.transpose(1, 2, 0), d, rgb=rgb,
                                    luma_weights=params.luma_weights)
        np.testing.assert_allclose(g.transpose(1, 2, 0), want, rtol=1e-5, atol=2e-5,
                                   err_msg=str(d["order"]))
