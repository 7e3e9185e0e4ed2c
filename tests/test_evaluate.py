"""Downstream evaluation, online kNN monitor and report plots.

Everything runs offline: TFDS datasets come from `tfds.testing.mock_data` (random examples,
or planted class-dependent images through `as_dataset_fn`).
"""

import glob
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import snapshot

from configs import quickstart
from softcon_jax import cli, defaults, evaluate, interop, methods, models, optim, pretrained, report
from softcon_jax import sharding, state, train
from softcon_jax.data import augment, normalize
from softcon_jax.evaluators import backbone as backbone_lib
from softcon_jax.evaluators import knn, linear_probe, metrics, tfds_datasets
from softcon_jax.evaluators.online_knn import OnlineKNN
from softcon_jax.logs import MetricWriter

# ---- metrics against the definition ----------------------------------------------------


def _ap_by_definition(scores, labels):
    """AP = mean over positives i of #{pos j: s_j >= s_i} / #{j: s_j >= s_i} (float64 loops)."""
    scores = [float(s) for s in scores]
    pos = [i for i, y in enumerate(labels) if y]
    total = 0.0
    for i in pos:
        above = [j for j in range(len(scores)) if scores[j] >= scores[i]]
        total += sum(1 for j in above if labels[j]) / len(above)
    return total / len(pos)


def test_average_precision_matches_definition_with_ties():
    assert metrics.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(
        (1 / 1 + 2 / 3) / 2)
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((80, 6)), 1)  # coarse: many tied scores
    labels = (rng.random((80, 6)) < 0.3).astype(np.float32)
    labels[:, 4] = 0  # a class without positives: excluded from macro
    result = metrics.mean_average_precision(scores, labels)
    per_class = [_ap_by_definition(scores[:, c], labels[:, c]) for c in range(6) if c != 4]
    assert result["map_macro"] == pytest.approx(np.mean(per_class), abs=1e-12)
    assert result["map_micro"] == pytest.approx(
        _ap_by_definition(scores.ravel(), labels.ravel()), abs=1e-12)
    assert result["num_classes_evaluated"] == 5


# ---- kNN and linear probe discrimination -----------------------------------------------


@pytest.mark.parametrize("weighting", ["dino", "majority"])
def test_knn_separates_planted_classes_and_is_chance_on_random_labels(weighting):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(10, 32))
    y_train, y_test = rng.integers(0, 10, 2000), rng.integers(0, 10, 4000)
    x_train = centers[y_train] + 0.5 * rng.normal(size=(2000, 32))
    x_test = centers[y_test] + 0.5 * rng.normal(size=(4000, 32))
    onehot = np.eye(10, dtype=np.float32)
    kw = dict(k=20, temperature=0.07, weighting=weighting)

    scores = knn.knn_scores_chunked(x_train.astype(np.float32), onehot[y_train],
                                         x_test.astype(np.float32), **kw)
    assert metrics.top1_accuracy(scores, y_test) > 0.9

    # Labels independent of the features: accuracy near 1/10.
    scores = knn.knn_scores_chunked(x_train.astype(np.float32),
                                         onehot[rng.permutation(y_train)],
                                         x_test.astype(np.float32), **kw)
    assert abs(metrics.top1_accuracy(scores, y_test) - 0.1) < 0.03


def test_linear_probe_learns_planted_labels_single_and_multilabel():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(5, 24))
    y = rng.integers(0, 5, 1500)
    x = (centers[y] + 0.5 * rng.normal(size=(1500, 24))) * 3.0 + 5.0  # unstandardised
    x = x.astype(np.float32)
    probe = linear_probe.train_linear_probe(x[:1000], y[:1000], num_classes=5,
                                        multilabel=False)
    assert metrics.top1_accuracy(probe.logits(x[1000:]), y[1000:]) > 0.9

    # Multi-label: each sample is tagged with its own class and its cluster's "neighbour".
    multi = np.eye(5, dtype=np.float32)[y] + np.eye(5, dtype=np.float32)[(y + 1) % 5]
    probe = linear_probe.train_linear_probe(x[:1000], multi[:1000], num_classes=5,
                                        multilabel=True)
    assert metrics.mean_average_precision(probe.logits(x[1000:]),
                                           multi[1000:])["map_macro"] > 0.9
    shuffled = multi[rng.permutation(1500)]
    probe = linear_probe.train_linear_probe(x[:1000], shuffled[:1000], num_classes=5,
                                        multilabel=True)
    prevalence = shuffled[1000:].mean(axis=0)  # the AP of uninformative scores
    got = metrics.mean_average_precision(probe.logits(x[1000:]), shuffled[1000:])
    assert abs(got["map_macro"] - prevalence.mean()) < 0.08


# ---- preprocessing -----------------------------------------------------------------------


def _tiny_backbone(img_size=16):
    model = models.build_backbone("vit_small_patch14_dinov2", in_channels=13,
                                  img_size=img_size, patch_size=4, embed_dim=32, depth=2,
                                  num_heads=2, init_values=1.0)
    variables = model.init(jax.random.key(0), np.zeros((1, img_size, img_size, 13),
                                                       np.float32))
    return model, variables


def test_bigearthnet_input_band_order_normalisation_and_zero_b10():
    backbone = backbone_lib.Backbone(None, {}, list(normalize.S2C_BANDS),
                                     normalize.make_normalizer("softcon", "s2c",
                                                               normalize.S2C_BANDS),
                                     {"name": "softcon", "stats": "s2c"}, 16, 0, "test")
    rng = np.random.default_rng(3)
    sizes = {"B01": 20, "B09": 20, "B02": 120, "B03": 120, "B04": 120, "B08": 120}
    batch = {b: rng.uniform(0, 5000, (2, sizes.get(b, 60), sizes.get(b, 60)))
             .astype(np.float32) for b in tfds_datasets.BIGEARTHNET_BANDS}
    batch["target"] = np.zeros((2, 43), np.float32)
    bands, _ = tfds_datasets._bigearthnet_to_bands(batch, "43")
    x = backbone_lib.model_input(bands, backbone, "bigearthnet")
    assert x.shape == (2, 120, 120, 13)
    assert np.all(x[..., normalize.S2C_BANDS.index("B10")] == 0.0)
    # B8A (60 px, upsampled) lands at model channel 8 with SoftCon's formula.
    raw = augment.resize_bilinear(np.moveaxis(batch["B8A"], 0, -1), (120, 120))
    stats = normalize.STATS["s2c"]["B8A"]
    lo = stats["mean"] - 2 * stats["std"]
    want = np.clip((np.moveaxis(raw, -1, 0).astype(np.float64) - lo) / (4 * stats["std"]),
                   0, 1)
    np.testing.assert_allclose(x[..., 8], want, atol=1e-5)


def test_eurosat_b8a_is_reordered_and_device_resize_matches_pipeline():
    img = np.zeros((1, 64, 64, 13), np.float32)
    img[..., 12] = 7.0  # TIFF channel 13 is B8A
    bands, _ = tfds_datasets._eurosat_to_bands({"image": img, "target": np.zeros(1)}, "19")
    assert np.all(bands["B8A"] == 7.0) and np.all(bands["B9"] == 0.0)

    model, variables = _tiny_backbone(img_size=24)
    backbone = backbone_lib.Backbone(model, variables, list(normalize.S2C_BANDS), None, {}, 24,
                                     0, "test", features_fn=pretrained.features_fn(model))
    ext = tfds_datasets.FeatureExtractor(backbone, batch_size=8)
    x = np.random.default_rng(4).random((8, 64, 64, 13), dtype=np.float32)
    for size in (24, 100):  # down and up
        resize = jax.jit(lambda v, s=size: jax.image.resize(
            v, (8, s, s, 13), "bilinear", antialias=False))
        want = np.stack([augment.resize_bilinear(im, (size, size)) for im in x])
        np.testing.assert_allclose(np.asarray(resize(x)), want, atol=1e-5)
    got = np.asarray(ext(x))
    want = np.asarray(interop.backbone_features(
        model, variables, np.stack([augment.resize_bilinear(im, (24, 24)) for im in x])))
    np.testing.assert_allclose(got, want, atol=1e-4)


# ---- end to end: --weights on planted mock EuroSAT ---------------------------------------


def _planted_eurosat(num_train=200, num_test=100):
    """as_dataset_fn: class-dependent spectra (TIFF band order), different train/test draws."""
    mean = np.array([normalize.STATS["s2c"][b]["mean"] for b in tfds_datasets.EUROSAT_BANDS])
    std = np.array([normalize.STATS["s2c"][b]["std"] for b in tfds_datasets.EUROSAT_BANDS])
    signature = np.random.default_rng(10).uniform(-1.5, 1.5, (10, 13))

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        test = "80%:" in str(split)
        rng = np.random.default_rng(12 if test else 11)
        n = num_test if test else num_train
        label = rng.integers(0, 10, n)
        img = mean + std * (signature[label][:, None, None, :]
                            + 0.3 * rng.normal(size=(n, 64, 64, 13)))
        return tf.data.Dataset.from_tensor_slices({
            "sentinel2": img.astype(np.float32), "label": label.astype(np.int64),
            "filename": np.array([f"{i}.tif" for i in range(n)])})
    return as_dataset


def test_weights_cli_knn_and_linear_on_planted_eurosat(tmp_path):
    model, variables = _tiny_backbone()
    weights = str(tmp_path / "bb.safetensors")
    interop.export_torch(model, variables, weights, band_order=normalize.S2C_BANDS,
                         normalization={"name": "softcon", "stats": "s2c"})
    with tfds.testing.mock_data(as_dataset_fn=_planted_eurosat()):
        knn = evaluate.main(["--weights", weights, "--task", "eurosat_knn",
                             "--out", str(tmp_path / "knn.json"), "--batch-size", "64"])
        lin = evaluate.main(["--weights", weights, "--task", "eurosat_linear",
                             "--out", str(tmp_path / "lin.json"), "--batch-size", "64",
                             "--train-fraction", "0.5"])
    assert knn["metrics"]["top1"] > 0.9, knn["metrics"]
    assert lin["metrics"]["top1"] > 0.9, lin["metrics"]
    assert knn["num_train"] == 200 and lin["num_train"] == 100 and lin["num_test"] == 100
    saved = json.loads((tmp_path / "knn.json").read_text())
    assert saved["metrics"] == knn["metrics"]
    assert saved["input"]["band_order"] == normalize.S2C_BANDS
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))

    with pytest.raises(FileNotFoundError, match="sidecar"):
        os.remove(weights + ".json")
        evaluate.main(["--weights", weights, "--task", "eurosat_knn"])


@pytest.mark.parametrize("change", ["bands", "architecture"])
def test_weights_whose_sidecar_disagrees_are_refused_naming_both(tmp_path, tmp_path_factory,
                                                                 monkeypatch, capsys, change):
    """A 13-band file whose sidecar says 12 bands (or another ViT width) is never evaluated
    with a re-drawn first layer: one error line naming the file's and the sidecar's values,
    no results written."""
    model, variables = _tiny_backbone()
    weights = str(tmp_path / "bb.safetensors")
    interop.export_torch(model, variables, weights, band_order=normalize.S2C_BANDS,
                         normalization={"name": "softcon", "stats": "s2c"})
    sidecar = json.loads(open(weights + ".json").read())
    if change == "bands":
        sidecar["in_chans"], sidecar["band_order"] = 12, normalize.S2A_BANDS
        named = ["in_chans=12", "patch_embed.proj.weight has 13 input channels, the model 12"]
    else:
        sidecar["timm_kwargs"]["embed_dim"] = 48
        named = ["'embed_dim': 48", "cls_token: file (1, 1, 32) vs model (1, 1, 48)"]
    with open(weights + ".json", "w") as f:
        json.dump(sidecar, f)
    monkeypatch.setenv(cli.LOG_DIR_ENV, str(tmp_path_factory.mktemp("logs")))
    before = snapshot(str(tmp_path))
    out = str(tmp_path / "out.json")
    with pytest.raises(pretrained.SidecarMismatchError) as err:
        evaluate.main(["--weights", weights, "--task", "eurosat_knn", "--out", out])
    message = str(err.value)
    assert f"--weights {weights} does not match its sidecar {weights}.json" in message
    for text in named:
        assert text in message, message
    assert cli.call(evaluate.main, ["--weights", weights, "--task", "eurosat_knn",
                                    "--out", out]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("error:")]
    assert len(errors) == 1 and named[0] in errors[0]
    assert snapshot(str(tmp_path)) == before


# ---- end to end: --workdir, BigEarthNet, online monitor, report -------------------------


def _config(tmp_path):
    config = quickstart.get_config("test")
    config.unlock()
    config.data.path = str(tmp_path / "data")
    config.total_steps = 2
    config.log_every_steps = 1
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    config.eval = defaults.online_eval()
    config.eval.update(dict(every_steps=1, data_path=str(tmp_path / "eval_data"),
                            num_train=40, num_val=16, knn_k=5, batch_size=16))
    config.eval.synthetic = dict(num_locations=64, num_shards=1, image_size=20, bands=13,
                                 timesteps=2, seed=1)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step quickstart run (1 device: compiles fastest) with its checkpoint."""
    tmp_path = tmp_path_factory.mktemp("run")
    config = _config(tmp_path)
    workdir = str(tmp_path / "workdir")
    state = train.train(config, workdir, devices=jax.devices()[:1])
    return config, workdir, jax.device_get(state)


@pytest.fixture(scope="module")
def monitored(trained):
    """The online monitor on the 8-device mesh, run as the train loop would at steps 1, 2."""
    config, workdir, trained_state = trained
    mesh = sharding.make_mesh(config.mesh)
    method = methods.get(config.method)(config, mesh)
    tx, _ = optim.make_optimizer(config)
    init_fn, rng, _, shardings = state.create_train_state(config, method, tx, mesh)
    states = [init_fn(rng), jax.device_put(trained_state, shardings)]
    monitor = OnlineKNN.for_method(config, mesh, method)
    results = [monitor.maybe_run(step, s) for step, s in zip((1, 2), states)]
    writer = MetricWriter(workdir)
    for step, result in zip((1, 2), results):
        writer.write_scalars(step, result)
    writer.close()
    return monitor, method, states, results


def test_online_knn_runs_without_recompiling(trained, monitored):
    config, _, _ = trained
    monitor, method, states, results = monitored
    assert (monitor.num_train, monitor.num_val) == (40, 16)
    assert monitor._run._cache_size() == 1  # the second call reused the compilation
    for result in results:
        assert set(result) == {"eval/knn_top1", "eval/knn_map_micro", "eval/knn_map_macro",
                               "eval/knn_time_s"}
        assert 0.0 <= result["eval/knn_top1"] <= 1.0
        assert 0.0 < result["eval/knn_map_macro"] <= 1.0

    # The jitted, sharded forward equals eval-mode features computed directly.
    variables = monitor.variables(states[1])  # the trainer's backbone variables
    _, feats = monitor._run(variables, monitor.images)
    images = np.asarray(monitor.images, np.float32).reshape((-1,) + monitor.images.shape[2:])
    want = interop.backbone_features(method.backbone, jax.device_get(variables), images)
    np.testing.assert_allclose(np.asarray(feats), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert monitor._run._cache_size() == 1

    other = ml_collections.ConfigDict(config.to_dict())
    other.eval.every_steps = 0  # off
    assert OnlineKNN.for_method(other, None, method).maybe_run(2, states[1]) is None
    other.eval.every_steps = 2
    assert OnlineKNN.for_method(other, monitor.mesh, method).maybe_run(3, states[1]) is None


def test_workdir_bigearthnet_linear_end_to_end(trained):
    _, workdir, _ = trained
    with tfds.testing.mock_data(num_examples=24):
        result = evaluate.main(["--workdir", workdir, "--task", "bigearthnet_linear",
                                "--batch-size", "16", "--train-fraction", "0.5"])
    assert result["step"] == 2
    assert 0.0 < result["metrics"]["map_macro"] <= 1.0
    assert 0.0 < result["metrics"]["map_micro"] <= 1.0
    assert result["num_train"] == 12 and result["num_test"] == 24
    assert result["num_classes"] == 19 and result["input"]["img_size"] == 16
    assert result["input"]["zero_filled_after_normalisation"] == ["B10"]
    assert result["input"]["input_scale"] == 1.0  # uint16 reflectance x 10000, as TFDS
    saved = json.loads(open(os.path.join(workdir, "eval", "bigearthnet_linear_step2.json"))
                       .read())
    assert saved["metrics"] == result["metrics"]
    scalars = report.read_scalars(os.path.join(workdir, "tensorboard"))
    steps, values = scalars["eval/bigearthnet_linear/map_macro"]
    assert list(steps) == [2]
    assert values[0] == pytest.approx(result["metrics"]["map_macro"], rel=1e-6)


def _curve_pixels(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]  # floats in [0, 1]
    blue = np.array([31, 119, 180]) / 255.0  # matplotlib's first line colour
    return img, int(np.sum(np.all(np.abs(img - blue) < 0.08, axis=-1)))


def test_report_pngs_render_training_and_eval_curves(trained, monitored, tmp_path):
    _, workdir, _ = trained
    written = report.main(["--workdir", workdir, "--out", str(tmp_path / "report")])
    assert set(written) == {"training", "eval", "scalars"}
    for name in ("training", "eval"):
        img, curve = _curve_pixels(written[name])
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img.std() > 0.05   # not blank
        assert curve > 50         # the lines are drawn
    summary = json.loads(open(written["scalars"]).read())
    for tag in ("loss/total", "loss/view1_to_view2", "loss/view2_to_view1", "train/lr",
                "perf/images_per_s", "eval/knn_top1"):
        # The trainer's online kNN also ran at step 0 (the random backbone).
        points = 3 if tag.startswith("eval/") else 2
        assert summary[tag]["step"] == 2 and summary[tag]["num_points"] == points, tag


def test_report_reader_merges_resumed_event_files(tmp_path):
    from tensorboardX import SummaryWriter

    logdir = tmp_path / "w" / "tensorboard"
    first = SummaryWriter(str(logdir))
    for step, value in [(1, 3.0), (2, 2.0), (3, 9.0)]:
        first.add_scalar("loss/total", value, step)
    first.close()
    # Resumed from step 2: step 3 is logged again, into a second event file.
    second = SummaryWriter(str(logdir), filename_suffix=".resumed")
    for step, value in [(3, 1.5), (4, 1.0)]:
        second.add_scalar("loss/total", value, step)
    second.add_scalar("eval/knn_top1", 0.5, 4)
    second.close()
    scalars = report.read_scalars(str(logdir))
    np.testing.assert_array_equal(scalars["loss/total"][0], [1, 2, 3, 4])
    np.testing.assert_allclose(scalars["loss/total"][1], [3.0, 2.0, 1.5, 1.0])
    written = report.make_report(str(tmp_path / "w"))
    assert os.path.exists(written["training"]) and os.path.exists(written["eval"])
