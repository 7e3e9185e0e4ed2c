"""augment_on='device': the device views equal the host views for the same seed and record."""

import jax
import numpy as np
import pytest

from softcon_jax import data
from softcon_jax.data import augment, device_augment, normalize, synthetic, views

ON = {"jitter_prob": 1.0, "grayscale_prob": 0.5, "blur_prob": (1.0, 0.5), "hflip_prob": 0.5}
OFF = {"jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": (0.0,), "hflip_prob": 0.0}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = {}
    for modality in ("s2c", "s1", "seco"):
        path = str(tmp_path_factory.mktemp(modality))
        synthetic.write_dataset(path, num_locations=8, num_shards=2, image_size=20,
                                modality=modality)
        out[modality] = path
    return out


def _cfg(path, views_name, **kw):
    cfg = data.default_config()
    cfg.path, cfg.views, cfg.image_size, cfg.read_threads = path, views_name, 12, 1
    for k, v in kw.items():
        if k == "augment":
            for a, b in v.items():
                cfg.augment[a] = b
        else:
            cfg[k] = v
    return cfg


def _both(cfg, batches=1, batch=4):
    """(host batches, device batches) of the same seed."""
    host = iter(data.build_dataset(cfg, global_batch_size=batch, seed=3))
    cfg.augment_on = "device"
    dev = iter(data.build_dataset(cfg, global_batch_size=batch, seed=3))
    fn = jax.jit(data.build_device_views(cfg))
    pairs = [(next(host), fn(next(dev))) for _ in range(batches)]
    cfg.augment_on = "host"
    return pairs


def _assert_equal(pairs, bf16=False):
    for h, d in pairs:
        assert set(h) == set(d)
        for k in h:
            assert d[k].shape == h[k].shape and d[k].dtype == h[k].dtype, k
            got, want = np.asarray(d[k], np.float32), np.asarray(h[k], np.float32)
            if bf16:  # float32 rounding can move a bf16 rounding by one step
                np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-5, err_msg=k)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=k)


S2C_CASES = {
    "defaults": {},
    "all_on_random_per_band": {"augment": {**ON, "per_band_jitter": True,
                                           "jitter_order": "random", "saturation": 0.4}},
    "all_off": {"augment": OFF},
    "only_jitter": {"augment": {**OFF, "jitter_prob": 1.0}},
    "only_grayscale": {"augment": {**OFF, "grayscale_prob": 1.0}},
    "only_blur": {"augment": {**OFF, "blur_prob": (1.0,)}},
    "only_flip": {"augment": {**OFF, "hflip_prob": 1.0}},
    "quantize_uint8": {"quantize_uint8": True, "augment": ON},
    "zscore": {"normalization": "zscore", "augment": ON},
}


@pytest.mark.parametrize("case", sorted(S2C_CASES))
def test_softcon_s2c_device_equals_host(datasets, case):
    _assert_equal(_both(_cfg(datasets["s2c"], "softcon", **S2C_CASES[case])))


def test_softcon_s2c_bfloat16(datasets):
    _assert_equal(_both(_cfg(datasets["s2c"], "softcon", dtype="bfloat16", augment=ON)),
                  bf16=True)


@pytest.mark.parametrize("quantize", [False, True])
def test_softcon_s1_per_image_quantile_clip(datasets, quantize):
    cfg = _cfg(datasets["s1"], "softcon", in_channels=2, stats="s1", augment=ON,
               quantize_uint8=quantize)
    _assert_equal(_both(cfg))


SECO = dict(in_channels=3, bands=("B4", "B3", "B2"), normalization="seco_quantile",
            stats="seco")


@pytest.mark.parametrize("case", ["defaults", "all_on", "fixed_order", "quantize",
                                  "other_luma", "crop_first"])
def test_seco_rgb_device_equals_host(datasets, case):
    kw = {"defaults": {}, "all_on": {"augment": ON},
          "fixed_order": {"augment": {**ON, "jitter_order": "fixed"}},
          "quantize": {"quantize_uint8": True, "augment": ON},
          "other_luma": {"augment": {**ON, "luma_weights": (0.2989, 0.587, 0.114)}},
          "crop_first": {"augment": {**ON, "augment_before_crop": False}}}[case]
    _assert_equal(_both(_cfg(datasets["seco"], "seco", **SECO, **kw)))


def test_seco_bfloat16(datasets):
    _assert_equal(_both(_cfg(datasets["seco"], "seco", **SECO, dtype="bfloat16",
                             augment=ON)), bf16=True)


def test_device_batch_ships_raw_images_in_stored_dtype(datasets):
    cfg = _cfg(datasets["seco"], "seco", **SECO, augment_on="device")
    batch = next(iter(data.build_dataset(cfg, global_batch_size=2, seed=0)))
    assert {k: v.dtype for k, v in batch["images"].items()} == {
        "t0": np.uint8, "t1": np.uint8, "t2": np.uint8}
    assert batch["images"]["t0"].shape == (2, 3, 20, 20)
    transform = data.build_views_transform(cfg, data.load_metadata(cfg.path)[0], cfg.path)
    spec = transform.device_element_spec((3, 20, 20), np.uint8)
    flat = jax.tree.leaves(jax.tree.map(lambda v, s: (v.shape[1:], v.dtype) == (s[0], s[1]),
                                        batch, spec, is_leaf=lambda x: isinstance(x, tuple)))
    assert all(flat)


def test_quantize_thresholds_are_exact():
    norm = normalize.make_normalizer("softcon", "s2c", normalize.S2C_BANDS, quantize=True)
    x = np.arange(0, 12000, dtype=np.float32)[:, None].repeat(13, 1)
    want = norm.unit(x)
    t = device_augment.quantize_thresholds(norm)
    got = (x[..., None] >= t[None]).sum(-1).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(got, want)


def test_blur_kernel_is_scipys():
    from scipy import ndimage
    x = np.random.default_rng(0).random((9, 9, 2)).astype(np.float32)
    for sigma in (0.1, 0.7, 2.0):
        k = device_augment.blur_kernel(sigma, 6)
        ours = np.asarray(device_augment._blur(x.transpose(2, 0, 1), k, 6)).transpose(1, 2, 0)
        np.testing.assert_allclose(ours, augment.gaussian_blur(x, sigma), atol=1e-6)
    assert ndimage is not None


def test_unknown_augment_on_and_unsupported_views_name_the_key(datasets):
    with pytest.raises(ValueError, match="config.data.augment_on='gpu'"):
        data.build_dataset(_cfg(datasets["s2c"], "softcon", augment_on="gpu"),
                           global_batch_size=2, seed=0)

    class HostOnly(views.Views):
        @classmethod
        def element_spec(cls, size, channels, dtype=np.float32):
            return {"x": ((size, size, channels), dtype)}

        def views(self, example, rng):
            return {"x": np.zeros((12, 12, 13), np.float32)}

    with pytest.raises(ValueError, match="config.data.augment_on='host'"):
        data.build_dataset(_cfg(datasets["s2c"], "softcon", augment_on="device"),
                           global_batch_size=2, seed=0, views=HostOnly)


# ------------------------------------------------------------------ in the train step


def _train_config(tmp_path, **overrides):
    import helpers
    from configs import quickstart
    config = quickstart.get_config("test")
    config.unlock()
    overrides = {"data.path": str(tmp_path / "data"), "optimizer.name": "sgd",
                 "optimizer.lr": 0.5, "optimizer.momentum": 0.9,
                 "schedule.warmup_steps": 0, "model.backbone_kwargs.init_values": 1.0,
                 **overrides}
    return helpers.set_dotted(config, overrides)


def _steps(config, devices, batches, augment_on):
    from softcon_jax import methods, optim, sharding, state as state_lib, step as step_lib
    mesh = sharding.make_mesh(config.mesh, devices)
    method = methods.get(config.method)(config, mesh)
    tx, schedule = optim.make_optimizer(config)
    init_fn, rng, _, shardings = state_lib.create_train_state(config, method, tx, mesh)
    state = init_fn(rng)
    config.data.augment_on = augment_on
    pre = data.build_device_views(config.data, "float32", method.views)
    step = step_lib.jit_train_step(config, method, tx, schedule, mesh, shardings, pre)
    for batch in batches:
        state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics)


def _batches(config, augment_on, n=2):
    from softcon_jax.data.source import ensure_synthetic_data
    from softcon_jax import methods
    ensure_synthetic_data(config.data)
    config.data.augment_on = augment_on
    it = iter(data.build_dataset(config.data, global_batch_size=config.global_batch_size,
                                 seed=config.seed, dtype="float32",
                                 views=methods.get(config.method).views))
    return [next(it) for _ in range(n)]


def _close(a, b, rtol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    diff = sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
               for x, y in zip(la, lb))
    norm = sum(np.sum(np.asarray(y, np.float64) ** 2) for y in lb)
    assert np.sqrt(diff / norm) <= rtol, np.sqrt(diff / norm)


def test_device_mode_step_equals_host_mode_and_eight_devices_equal_one(tmp_path):
    from softcon_jax import methods, sharding
    assert jax.device_count() == 8
    config = _train_config(tmp_path)
    dev_batches = _batches(config, "device", n=1)
    host_batches = _batches(config, "host", n=1)
    # The views themselves: sharded over 8 devices = on one device = the host's.
    config.data.augment_on = "device"
    pre = jax.jit(data.build_device_views(config.data, "float32", methods.get("softcon").views))
    mesh8 = sharding.make_mesh(config.mesh, jax.devices())
    on8 = jax.device_get(pre(sharding.host_batch_to_global(dev_batches[0], mesh8)))
    on1 = jax.device_get(pre(dev_batches[0]))
    for k in host_batches[0]:
        np.testing.assert_allclose(on8[k], on1[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(on8[k], host_batches[0][k], rtol=1e-5, atol=2e-5)
    # The train step: views differ by float32 rounding (~1e-7), which the backward pass
    # and an SGD step at lr 0.5 amplify to ~3e-5; a wrong view moves them by >= 1e-3.
    state8, m8 = _steps(config, jax.devices(), dev_batches, "device")
    host8, h8 = _steps(config, jax.devices(), host_batches, "host")
    config1 = _train_config(tmp_path, **{"mesh.data": 1, "mesh.fsdp": 1})
    state1, m1 = _steps(config1, jax.devices()[:1], dev_batches, "device")
    np.testing.assert_allclose(m8["loss/total"], h8["loss/total"], rtol=1e-5)
    np.testing.assert_allclose(m8["loss/total"], m1["loss/total"], rtol=1e-5)
    _close(state8.params, state1.params, 1e-4)
    _close(state8.params, host8.params, 1e-4)


def test_device_mode_resume_is_exact(tmp_path):
    from softcon_jax import train
    kw = {"data.augment_on": "device", "total_steps": 4, "checkpoint.every_steps": 2}
    straight = train.train(_train_config(tmp_path, **kw), str(tmp_path / "straight"))
    train.train(_train_config(tmp_path, **kw, stop_after_step=2), str(tmp_path / "resumed"))
    resumed = train.train(_train_config(tmp_path, **kw), str(tmp_path / "resumed"))
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.params)),
                    jax.tree.leaves(jax.device_get(resumed.params))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
