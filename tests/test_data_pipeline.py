"""Grain pipeline: determinism, resume, host sharding, views, augmentations, normalisation."""

import os

import grain
import jax
import numpy as np
import pytest
from scipy import ndimage

from softcon_jax import data
from softcon_jax.data import augment, normalize, records, shards, synthetic
from softcon_jax.methods.softcon import SoftConViews

S2C_MEAN = np.array([1605.58, 1390.78, 1314.87, 1363.52, 1549.44, 2091.75, 2371.72, 2299.90,
                     2560.30, 830.07, 22.10, 2177.07, 1524.07])
S2C_STD = np.array([786.79, 850.35, 875.06, 1138.85, 1122.18, 1161.59, 1274.39, 1248.43,
                    1345.53, 577.32, 51.15, 1336.10, 1136.54])


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    synthetic.write_dataset(out, num_locations=12, num_shards=3, image_size=16)
    return out


def _constant_example(i, timesteps):
    # Season t of location i: every pixel of band c is 1000 * (t + 1) + 10 * c + i.
    t = np.arange(timesteps)[:, None, None, None]
    c = np.arange(13)[None, :, None, None]
    image = np.broadcast_to(1000 * (t + 1) + 10 * c + i, (timesteps, 13, 16, 16))
    labels = np.eye(9, dtype=np.uint8)[:timesteps] if timesteps <= 9 else None
    return {"image": image.astype(np.uint16), "labels": labels,
            "has_label": np.ones(timesteps, bool), "location": f"{i:07d}",
            "seasons": [f"s{k}" for k in range(timesteps)]}


def _constant_dataset(out, timesteps):
    meta = {"dataset": "const", "modality": "s2c", "bands": normalize.S2C_BANDS,
            "dtype": "uint16", "timesteps": timesteps, "image_size": 16}
    shards.write_shards(out, range(6), lambda i: _constant_example(i, timesteps), name="c",
                        num_shards=2, metadata=meta)
    return out


def _cfg(path, **kw):
    cfg = data.default_config()
    cfg.path = path
    cfg.views = "softcon"  # the trainer sets it from config.method
    cfg.image_size = 8
    cfg.read_threads = 1
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_same_seed_gives_identical_batches(syn_dir):
    cfg = _cfg(syn_dir)
    a = _take(iter(data.build_dataset(cfg, global_batch_size=4, seed=3)), 4)
    b = _take(iter(data.build_dataset(cfg, global_batch_size=4, seed=3)), 4)
    c = _take(iter(data.build_dataset(cfg, global_batch_size=4, seed=4)), 4)
    assert _same(a, b)
    assert not _same(a, c)


def test_restoring_iterator_state_mid_epoch_continues_exactly(syn_dir, tmp_path):
    import orbax.checkpoint as ocp

    cfg = _cfg(syn_dir)
    it = iter(data.build_dataset(cfg, global_batch_size=4, seed=0))
    _take(it, 2)  # 12 records / 4 = 3 batches per epoch: stop mid-epoch
    state = it.get_state()
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 4)  # crosses into the next epoch

    fresh = iter(data.build_dataset(cfg, global_batch_size=4, seed=0))
    fresh.set_state(state)
    assert _same(_take(fresh, 4), expected)
    restored = iter(data.build_dataset(cfg, global_batch_size=4, seed=0))
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert _same(_take(restored, 4), expected)


@data.register_views("test_location_ids")
class _LocationIds(SoftConViews):
    def views(self, example, rng):
        return {"loc": np.int64(example["location"])}


def test_two_hosts_see_disjoint_samples_covering_the_dataset(syn_dir):
    cfg = _cfg(syn_dir, views="test_location_ids")
    epochs = []  # per host: [ids of epoch 1, ids of epoch 2]
    for host in range(2):
        it = iter(data.build_dataset(cfg, global_batch_size=4, seed=0, process_index=host,
                                     process_count=2))
        batches = _take(it, 6)  # 6 records per host per epoch, 2 per batch: two epochs
        assert all(b["loc"].shape == (2,) for b in batches)
        ids = np.concatenate([b["loc"] for b in batches]).tolist()
        epochs.append([ids[:6], ids[6:]])
    for e in range(2):  # every epoch is reshuffled globally, then split between hosts
        h0, h1 = epochs[0][e], epochs[1][e]
        assert len(set(h0)) == 6 and len(set(h1)) == 6
        assert set(h0).isdisjoint(h1) and set(h0) | set(h1) == set(range(12))


def test_softcon_batch_keys_shapes_and_range(syn_dir):
    b = next(iter(data.build_dataset(_cfg(syn_dir), global_batch_size=4, seed=0)))
    assert sorted(b) == ["labels1", "labels2", "view1", "view2"]
    for k in ("view1", "view2"):
        assert b[k].shape == (4, 8, 8, 13) and b[k].dtype == np.float32
        assert b[k].min() >= 0.0 and b[k].max() <= 1.0  # SoftCon mean +- 2 std clip
    for k in ("labels1", "labels2"):
        assert b[k].shape == (4, 9) and b[k].dtype == np.float32
        assert set(np.unique(b[k])) <= {0.0, 1.0}


def _season_of(view, band=1, offset_max=10):
    raw = view[..., band] * S2C_STD[band] + S2C_MEAN[band]  # undo zscore
    return np.round((raw.mean(axis=(1, 2)) - 10 * band) / 1000).astype(int) - 1


NO_COLOR = {"jitter_prob": 0.0, "grayscale_prob": 0.0}


def test_softcon_views_come_from_two_seasons_with_their_labels(tmp_path):
    path = _constant_dataset(str(tmp_path / "c"), timesteps=4)
    cfg = _cfg(path, normalization="zscore")
    cfg.augment.update(NO_COLOR)
    for b in _take(iter(data.build_dataset(cfg, global_batch_size=6, seed=1)), 3):
        s1, s2 = _season_of(b["view1"]), _season_of(b["view2"])
        np.testing.assert_array_equal(s1, b["labels1"].argmax(1))
        np.testing.assert_array_equal(s2, b["labels2"].argmax(1))
        assert np.all(s1 != s2)


def test_seco_views_follow_the_timestamp_scheme(tmp_path):
    path = _constant_dataset(str(tmp_path / "c"), timesteps=5)
    cfg = _cfg(path, normalization="zscore", views="seco", season_sampling="distinct")
    cfg.augment.update(NO_COLOR)
    b = next(iter(data.build_dataset(cfg, global_batch_size=6, seed=0)))
    assert sorted(b) == ["k0", "k1", "k2", "q"]
    t = {k: _season_of(v) for k, v in b.items()}
    np.testing.assert_array_equal(t["q"], t["k2"])  # q = t0, k2 = aug(t0)
    assert np.all((t["q"] != t["k0"]) & (t["q"] != t["k1"]) & (t["k0"] != t["k1"]))
    assert all(np.all((v >= 0) & (v < 5)) for v in t.values())


def _as_one_record_per_location(src: str, out: str) -> str:
    """A copy of dataset `src` in the older layout: one record (schema 2) per location."""
    import json

    from array_record.python.array_record_module import ArrayRecordWriter

    opened = data.open_dataset(src)
    os.makedirs(out)
    for shard, n, start in zip(opened.meta["shards"], opened.meta["shard_num_records"],
                               np.cumsum([0] + opened.meta["shard_num_records"])):
        w = ArrayRecordWriter(os.path.join(out, shard), "group_size:1")
        for i in range(start, start + n):
            ex = records.decode(opened.source[int(i)])
            w.write(records.encode({**ex, "image": np.asarray(ex["image"])}))
        w.close()
    meta = {k: v for k, v in opened.meta.items() if k != "records_per_location"}
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(dict(meta, record_schema_version=records.WHOLE_VERSION), f)
    return out


@pytest.mark.parametrize("augment_on", ["host", "device"])
@pytest.mark.parametrize("views", ["softcon", "seco"])
def test_older_one_record_per_location_datasets_give_the_same_batches(tmp_path, views,
                                                                      augment_on):
    path = _constant_dataset(str(tmp_path / "c"), timesteps=5)
    whole = _as_one_record_per_location(path, str(tmp_path / "whole"))
    a, b = (_take(iter(data.build_dataset(_cfg(p, views=views, augment_on=augment_on),
                                          global_batch_size=6, seed=2)), 2)
            for p in (path, whole))
    leaves = [jax.tree.leaves(x) for x in (a, b)]  # device mode nests images and draws
    assert len(leaves[0]) == len(leaves[1]) and all(
        np.array_equal(x, y) for x, y in zip(*leaves))


@pytest.mark.parametrize("views,used", [("softcon", 2), ("seco", 3)])
def test_only_the_seasons_a_sample_uses_are_read(tmp_path, monkeypatch, views, used):
    path = _constant_dataset(str(tmp_path / "c"), timesteps=5)
    k = data.open_dataset(path).meta["records_per_location"]
    assert k == 6
    read = []
    inner = grain.sources.ArrayRecordDataSource.__getitem__

    def counting(self, i):
        if str(self.paths[0]).startswith(path):  # not other tests' prefetch threads
            read.append(int(i))
        return inner(self, i)
    monkeypatch.setattr(grain.sources.ArrayRecordDataSource, "__getitem__", counting)
    cfg = _cfg(path, views=views, augment_on="device", season_sampling="distinct")
    it = iter(data.build_dataset(cfg, global_batch_size=6, seed=0))
    _take(it, 2)
    it.close()
    groups = []  # per location read (one read thread: in order), its season reads
    for i in read:
        if i % k == 0:
            groups.append([])
        else:
            assert groups and i // k == last // k  # a season of the location just read
            groups[-1].append(i)
        last = i if i % k == 0 else last
    assert len(groups) >= 12  # 2 batches of 6 (the reader may have started the next)
    assert all(len(set(g)) == len(g) == used for g in groups[:-1])  # of 5, each once
    assert len(groups[-1]) <= used


def test_band_count_mismatch_names_config_key_and_metadata(syn_dir):
    with pytest.raises(ValueError, match="data_config.in_channels=12") as e:
        data.build_dataset(_cfg(syn_dir, in_channels=12), global_batch_size=4, seed=0)
    assert os.path.join(syn_dir, "metadata.json") in str(e.value)
    with pytest.raises(ValueError, match="not divisible"):
        data.build_dataset(_cfg(syn_dir), global_batch_size=5, seed=0, process_count=2)


def test_worker_processes_give_the_same_batches(syn_dir):
    a = _take(iter(data.build_dataset(_cfg(syn_dir), global_batch_size=4, seed=0)), 3)
    it = iter(data.build_dataset(_cfg(syn_dir, num_workers=2), global_batch_size=4, seed=0))
    b = _take(it, 3)
    it.close()
    assert _same(a, b)


def test_host_batch_to_global_builds_sharded_batch(syn_dir):
    import jax

    from softcon_jax import sharding

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    b = next(iter(data.build_dataset(_cfg(syn_dir), global_batch_size=8, seed=0)))
    g = sharding.host_batch_to_global(b, mesh)
    assert g["view1"].shape == (8, 8, 8, 13) and len(g["view1"].addressable_shards) == 8
    assert g["view1"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
    np.testing.assert_array_equal(np.asarray(g["labels2"]), b["labels2"])
    assert jax.device_count() == 8


@pytest.mark.parametrize("views", ["softcon", "seco"])
def test_bfloat16_views_are_the_float32_views_rounded(syn_dir, views):
    # Shipping bf16 must be lossless for a bf16 model: exactly the float32 view, rounded.
    import ml_dtypes

    f32 = _take(iter(data.build_dataset(_cfg(syn_dir, views=views), global_batch_size=4,
                                        seed=3)), 2)
    b16 = _take(iter(data.build_dataset(_cfg(syn_dir, views=views), global_batch_size=4,
                                        seed=3, dtype="bfloat16")), 2)
    image_keys = ["view1", "view2"] if views == "softcon" else ["q", "k0", "k1", "k2"]
    for a, b in zip(f32, b16):
        assert sorted(a) == sorted(b)
        for k in a:
            if k in image_keys:
                assert b[k].dtype == ml_dtypes.bfloat16 and b[k].nbytes * 2 == a[k].nbytes
                np.testing.assert_array_equal(b[k], a[k].astype(ml_dtypes.bfloat16))
            else:  # labels keep their dtype
                assert b[k].dtype == a[k].dtype
                np.testing.assert_array_equal(b[k], a[k])


def test_view_dtype_from_config_and_worker_processes(syn_dir):
    import ml_dtypes

    it = iter(data.build_dataset(_cfg(syn_dir, dtype="bfloat16", num_workers=1),
                                 global_batch_size=4, seed=0))
    b = next(it)
    it.close()
    assert b["view1"].dtype == ml_dtypes.bfloat16 and b["labels1"].dtype == np.float32


def test_unknown_view_dtype_names_the_config_key(syn_dir):
    with pytest.raises(ValueError, match=r"data_config.dtype='int8'.*bfloat16"):
        data.build_dataset(_cfg(syn_dir, dtype="int8"), global_batch_size=4, seed=0)


# ----------------------------------------------------------------------------- augmentations

def _bilinear_reference(x, size):
    """float64 bilinear with pixel-centre alignment and edge clamp (independent)."""
    h, w, _ = x.shape
    ys = (np.arange(size[0]) + 0.5) * h / size[0] - 0.5
    xs = (np.arange(size[1]) + 0.5) * w / size[1] - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([ndimage.map_coordinates(x[..., c].astype(np.float64), [yy, xx], order=1,
                                             mode="nearest") for c in range(x.shape[-1])], -1)


@pytest.mark.parametrize("src,dst", [((9, 7), (16, 12)), ((30, 24), (8, 8)), ((5, 5), (5, 5))])
def test_resize_bilinear_matches_reference(src, dst):
    x = np.random.default_rng(0).random((*src, 3)).astype(np.float32)
    np.testing.assert_allclose(augment.resize_bilinear(x, dst), _bilinear_reference(x, dst),
                               atol=1e-5)


def test_crop_boxes_respect_bounds_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = augment.sample_crop_box(rng, 40, 30, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 30
        assert 0.15 <= h * w / 1200 <= 1.0


def test_color_ops_for_any_band_count():
    rng = np.random.default_rng(0)
    x = rng.random((10, 10, 7)).astype(np.float32)
    g = augment.grayscale(x)
    np.testing.assert_allclose(g, np.broadcast_to(x.mean(-1, keepdims=True), x.shape), rtol=1e-6)
    j = augment.color_jitter(x, rng, 0.4, 0.4, True, (np.zeros(7), np.ones(7)))
    assert j.shape == x.shape and j.min() >= 0 and j.max() <= 1 and not np.allclose(j, x)
    # Per band, without clamping, jitter is an affine map with factors in range.
    j = augment.color_jitter(x, np.random.default_rng(1), 0.4, 0.0, True, None)
    ratio = (j / x).reshape(-1, 7)
    assert np.allclose(ratio, ratio[0]) and np.all((ratio[0] >= 0.6) & (ratio[0] <= 1.4))
    assert len(np.unique(ratio[0].round(5))) == 7  # independent factor per band
    const = np.full((10, 10, 7), 0.3, np.float32)
    np.testing.assert_allclose(augment.gaussian_blur(const, 1.5), const, rtol=1e-6)
    blurred = augment.gaussian_blur(x, 1.5)
    ref = ndimage.gaussian_filter(x.astype(np.float64), (1.5, 1.5, 0), mode="reflect",
                                  truncate=3.0)
    np.testing.assert_allclose(blurred, ref, atol=1e-5)
    np.testing.assert_array_equal(augment.hflip(x)[:, 0], x[:, -1])


# ----------------------------------------------------------------------------- normalisation

def test_normalization_presets_match_formulas():
    x = np.random.default_rng(0).uniform(0, 8000, (4, 4, 13)).astype(np.float32)
    m, s = S2C_MEAN, S2C_STD
    soft = normalize.make_normalizer("softcon", "s2c", normalize.S2C_BANDS)(x)
    np.testing.assert_allclose(soft, np.clip((x - (m - 2 * s)) / (4 * s), 0, 1), atol=1e-6)
    z = normalize.make_normalizer("zscore", "s2c", normalize.S2C_BANDS)(x)
    np.testing.assert_allclose(z, (x - m) / s, rtol=1e-5, atol=1e-5)

    rgb = np.random.default_rng(1).integers(0, 255, (4, 4, 3)).astype(np.uint8)
    q = normalize.make_normalizer("seco_quantile", "seco", ["B4", "B3", "B2"])(rgb)
    lo, hi = np.array([0, 2, 3.0]), np.array([129, 103, 88.0])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    ref = np.clip((rgb - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(q, (ref - mean) / std, atol=1e-5)

    s1 = np.random.default_rng(2).normal(-15, 6, (2, 20, 20)).astype(np.float32)  # (C, H, W)
    n1 = normalize.make_normalizer("softcon", "s1", ["VV", "VH"])
    bounds = n1.quantile_bounds(s1)
    np.testing.assert_allclose(bounds, np.percentile(s1.reshape(2, -1), [1, 99], axis=1).T,
                               rtol=1e-5)
    m1, s1d = np.array([-12.548, -20.192]), np.array([5.257, 5.912])
    hwc = s1.transpose(1, 2, 0)
    clipped = np.clip(hwc, bounds[:, 0], bounds[:, 1])
    ref = np.clip((clipped - (m1 - 2 * s1d)) / (4 * s1d), 0, 1)
    np.testing.assert_allclose(n1(hwc, bounds), ref, atol=1e-5)


def test_measured_dataset_stats_for_bands_without_reference_values(syn_dir):
    cfg = _cfg(syn_dir, views="seco", normalization="seco_quantile", stats="dataset")
    b = next(iter(data.build_dataset(cfg, global_batch_size=4, seed=0)))
    q = b["q"]  # crop-only view: quantile scaling alone
    assert q.min() >= 0.0 and q.max() <= 1.0
    assert np.all((q.mean(axis=(0, 1, 2)) > 0.1) & (q.mean(axis=(0, 1, 2)) < 0.9))


def test_unknown_band_stats_error_names_config_key():
    with pytest.raises(ValueError, match="data_config.stats='seco'.*B8"):
        normalize.make_normalizer("seco_quantile", "seco", ["B4", "B8"])
