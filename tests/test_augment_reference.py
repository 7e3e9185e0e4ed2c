"""Augmentations, season sampling and input quantisation against the reference code.

- One SeCo view against torchvision's functional colour ops (``adjust_brightness``,
  ``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale``) applied,
  as ServiceNow/seasonal-contrast ``datasets/seco_dataset.py`` does, to the RGB image in
  [0, 1] (uint8 / 255) before the crop and the ImageNet normalisation.
- Repeated timestamps: SeCo's ``np.random.choice(paths, 3)`` repeats t0 in t1 about once in
  T; SoftCon's default seasons never repeat, its 'independent' ones once in S.
- uint8 quantisation: SSL4EO-S12 / SoftCon ``normalize()`` and SeCo ``normalize()``.
"""

import numpy as np
import pytest

from softcon_jax import data
from softcon_jax.data import augment, normalize, pipeline

torch = pytest.importorskip("torch")
F = pytest.importorskip("torchvision.transforms.functional")

RGB = ["B4", "B3", "B2"]
QUANTILES = {"B4": (0.0, 129.0), "B3": (2.0, 103.0), "B2": (3.0, 88.0)}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# torchvision's tensor rgb_to_grayscale uses 0.2989 for R (PIL, and our default, 0.299).
TV_LUMA = (0.2989, 0.587, 0.114)


def seco_reader_uint8(raw):
    """seco_dataset.py normalize(): (x - min_q) / (max_q - min_q), * 255, clip, uint8."""
    out = []
    for c, band in enumerate(RGB):
        lo, hi = QUANTILES[band]
        img = (raw[c].astype(np.float64) - lo) / (hi - lo)
        out.append(np.clip(img * 255.0, 0, 255).astype(np.uint8))
    return np.stack(out)  # (3, H, W)


def torchvision_view(rgb_uint8, trace):
    """The same draws applied with torchvision to the uint8 RGB tensor: ToTensor-like
    /255, the colour ops in the drawn order, grayscale, flip, then crop, bilinear resize
    (antialias False, like ours) and ImageNet normalisation last."""
    img = torch.from_numpy(rgb_uint8).float() / 255.0
    jit = trace.get("jitter")
    if jit:
        for op in jit["order"]:
            if op == "brightness":
                img = F.adjust_brightness(img, jit[op])
            elif op == "contrast":
                img = F.adjust_contrast(img, jit[op])
            elif op == "saturation":
                img = F.adjust_saturation(img, jit[op])
            elif op == "hue":
                img = F.adjust_hue(img, jit[op])
    if trace.get("grayscale"):
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    if trace.get("hflip"):
        img = F.hflip(img)
    top, left, h, w = trace["crop"]
    img = img[:, top:top + h, left:left + w][None]
    img = torch.nn.functional.interpolate(img, size=(trace["size"],) * 2, mode="bilinear",
                                          align_corners=False, antialias=False)[0]
    img = F.normalize(img, *IMAGENET)
    return img.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("grayscale_prob", [0.0, 1.0])
def test_seco_augmented_view_matches_torchvision_colour_ops(grayscale_prob):
    norm = normalize.make_normalizer("seco_quantile", "seco", RGB, quantize=True)
    params = data.views.resolve_augment(
        "seco", {"jitter_prob": 1.0, "grayscale_prob": grayscale_prob,
                 "luma_weights": TV_LUMA}, RGB)
    assert params.rgb and params.augment_before_crop
    assert (params.brightness, params.contrast, params.saturation, params.hue) == (
        0.4, 0.4, 0.4, 0.1)
    rng = np.random.default_rng(0)
    orders = set()
    for seed in range(8):
        raw = rng.integers(0, 140, (3, 40, 40)).astype(np.uint8)  # SeCo bands are uint8
        trace = {}
        view = augment.make_view(raw, np.random.default_rng(seed), size=24, normalizer=norm,
                                 params=params, blur_prob=0.0, trace=trace)
        assert set(trace["jitter"]) == {"order", "brightness", "contrast", "saturation", "hue"}
        orders.add(tuple(trace["jitter"]["order"]))
        ref = torchvision_view(seco_reader_uint8(raw), trace)
        np.testing.assert_allclose(view, ref, rtol=0, atol=1e-4, err_msg=f"seed {seed}")
    assert len(orders) > 1  # the op order is random, as ColorJitter's randperm


def test_rgb_grayscale_uses_pil_luminance_and_bands_use_the_mean():
    from PIL import Image
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    grey = augment.grayscale(rgb.astype(np.float32), augment.LUMA_WEIGHTS)
    assert grey.shape == (16, 16, 3)
    pil = np.asarray(Image.fromarray(rgb).convert("L"), np.float32)
    np.testing.assert_allclose(grey[..., 0], pil, atol=0.5 + 1e-3)  # PIL rounds to uint8
    x = np.random.default_rng(1).random((8, 8, 5)).astype(np.float32)
    np.testing.assert_allclose(augment.grayscale(x), np.repeat(x.mean(-1, keepdims=True), 5, -1),
                               rtol=1e-6)


def test_colour_ops_run_in_unit_space_before_the_standardisation():
    """A brightness of 1.4 on the [0, 1] image, then ImageNet standardisation: not the same
    as scaling the standardised image (the difference the reference order avoids)."""
    norm = normalize.make_normalizer("seco_quantile", "seco", RGB)
    params = augment.AugmentParams(jitter_prob=1.0, brightness=0.4, contrast=0.0,
                                   grayscale_prob=0.0, hflip_prob=0.0, rgb=True,
                                   crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    raw = np.random.default_rng(0).integers(0, 80, (3, 16, 16)).astype(np.uint8)
    trace = {}
    view = augment.make_view(raw, np.random.default_rng(3), size=16, normalizer=norm,
                             params=params, trace=trace)
    f = trace["jitter"]["brightness"]
    unit = norm.unit(raw.transpose(1, 2, 0))
    np.testing.assert_allclose(view, norm.finish(np.clip(unit * f, 0, 1)), atol=1e-5)
    assert np.abs(view - norm(raw.transpose(1, 2, 0)) * f).max() > 0.1


def test_hue_needs_rgb_and_names_the_key():
    twelve = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"]
    assert data.views.resolve_augment("seco", {}, twelve).hue == 0.0  # band set: no hue
    assert not data.views.resolve_augment("seco", {}, twelve).rgb
    with pytest.raises(ValueError, match="data_config.augment.hue=0.1"):
        data.views.resolve_augment("seco", {"hue": 0.1}, twelve)
    with pytest.raises(ValueError, match="data_config.augment.rgb=True"):
        data.views.resolve_augment("seco", {"rgb": True}, twelve)
    with pytest.raises(ValueError, match="data_config.augment.jitter_order"):
        data.views.resolve_augment("softcon", {"jitter_order": "sorted"}, twelve)


# ----------------------------------------------------------------------------- seasons

def _example(t):
    image = np.broadcast_to(np.arange(t, dtype=np.float32)[:, None, None, None], (t, 1, 6, 6))
    return {"image": image, "labels": np.eye(t, 9, dtype=np.uint8),
            "has_label": np.ones(t, bool)}


def _identity():
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    return normalize.Normalizer(one, zero, False, one, zero)


def _builder(views, sampling):
    params = augment.AugmentParams(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0,),
                                   crop_scale=(0.5, 1.0))
    return data.VIEWS.get(views)(size=4, band_index=None, normalizer=_identity(),
                                  params=params, season_sampling=sampling)


N = 3000


def _rate(hits, p):
    """Observed share, and 4 binomial standard deviations around p."""
    return np.mean(hits), 4 * np.sqrt(p * (1 - p) / len(hits))


@pytest.mark.parametrize("sampling", [None, "distinct"])
def test_seco_timestamps_repeat_about_once_in_t(sampling):
    t = 5
    builder, ex = _builder("seco", sampling), _example(t)
    draws = []
    for i in range(N):
        v = builder.views(ex, np.random.default_rng(i))
        draws.append([int(round(float(v[k].mean()))) for k in ("q", "k0", "k1")])
    draws = np.array(draws)  # t0, t1, t2
    if sampling is None:  # default: the reference, with replacement
        for a, b in ((0, 1), (0, 2), (1, 2)):
            rate, tol = _rate(draws[:, a] == draws[:, b], 1 / t)
            assert abs(rate - 1 / t) < tol, (a, b, rate)
        assert np.allclose(np.bincount(draws[:, 0], minlength=t) / N, 1 / t, atol=0.04)
    else:
        assert np.all((draws[:, 0] != draws[:, 1]) & (draws[:, 0] != draws[:, 2])
                      & (draws[:, 1] != draws[:, 2]))


@pytest.mark.parametrize("sampling", [None, "independent"])
def test_softcon_seasons_are_distinct_by_default_and_repeat_once_in_s_when_independent(
        sampling):
    s = 4
    builder, ex = _builder("softcon", sampling), _example(s)
    same = []
    for i in range(N):
        v = builder.views(ex, np.random.default_rng(i))
        s1, s2 = int(v["labels1"].argmax()), int(v["labels2"].argmax())
        assert s1 == int(round(float(v["view1"].mean())))  # labels follow the season
        same.append(s1 == s2)
    if sampling is None:
        assert not any(same)
    else:
        rate, tol = _rate(np.array(same), 1 / s)
        assert abs(rate - 1 / s) < tol, rate


def test_unknown_season_sampling_names_the_key():
    with pytest.raises(ValueError, match="data_config.season_sampling='sometimes'"):
        _builder("softcon", "sometimes")


# ----------------------------------------------------------------------------- uint8 step

def ssl4eo_normalize(img, mean, std):
    """SSL4EO-S12 / SoftCon normalize(): mean -+ 2 std to 0..255, clip, uint8."""
    min_value = mean - 2 * std
    max_value = mean + 2 * std
    img = (img - min_value) / (max_value - min_value) * 255.0
    return np.clip(img, 0, 255).astype(np.uint8)


def test_quantize_uint8_reproduces_the_reference_readers():
    bands = normalize.S2C_BANDS
    mean = np.array([normalize.STATS["s2c"][b]["mean"] for b in bands])
    std = np.array([normalize.STATS["s2c"][b]["std"] for b in bands])
    x = np.random.default_rng(0).integers(0, 6000, (20, 20, 13)).astype(np.uint16)
    q = normalize.make_normalizer("softcon", "s2c", bands, quantize=True)(x)
    ref = ssl4eo_normalize(x.astype(np.float64), mean, std).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(q, ref)  # ToTensor of the uint8 image
    f = normalize.make_normalizer("softcon", "s2c", bands)(x)
    assert 0 < np.abs(f - q).max() <= 1 / 255 + 1e-6  # floats: within one uint8 step

    rgb = np.random.default_rng(1).integers(0, 256, (3, 20, 20)).astype(np.uint8)
    n = normalize.make_normalizer("seco_quantile", "seco", RGB, quantize=True)
    unit = n.unit(rgb.transpose(1, 2, 0))
    np.testing.assert_array_equal(
        unit, seco_reader_uint8(rgb).transpose(1, 2, 0).astype(np.float32) / np.float32(255))
    with pytest.raises(ValueError, match="data_config.quantize_uint8"):
        normalize.make_normalizer("zscore", "s2c", bands, quantize=True)


def test_quantize_uint8_config_key_reaches_the_views():
    cfg = pipeline.default_config()
    assert cfg.quantize_uint8 is False  # training default: floats
    meta = {"bands": normalize.S2C_BANDS}
    assert not pipeline.make_normalizer(cfg, meta, "m.json").quantize
    cfg.quantize_uint8 = True
    assert pipeline.make_normalizer(cfg, meta, "m.json").quantize


def test_evaluation_can_feed_released_weights_the_quantised_input():
    from softcon_jax import evaluate, pretrained
    args = evaluate._parser().parse_args(["--weights", "w.safetensors", "--task",
                                          evaluate.available_tasks()[0], "--quantize-uint8"])
    assert args.quantize_uint8 is True
    n = pretrained._make_normalizer("softcon", "s2c", normalize.S2C_BANDS, "here",
                                  quantize=args.quantize_uint8)
    x = np.random.default_rng(0).integers(0, 6000, (4, 4, 13)).astype(np.float32)
    np.testing.assert_array_equal(n(x) * 255, np.round(n(x) * 255))  # uint8 steps
