"""Downstream datasets from tensorflow-datasets (EuroSAT, BigEarthNet) -> frozen features.

Images are put in the model's band order, normalised exactly as in pretraining
(`backbone.model_input`) and resized to the model's input size; features are extracted in
jitted, data-parallel batches with the backbone's feature function.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from softcon_jax.data import augment
from softcon_jax.evaluators.backbone import Backbone, canonical_band, model_input
from softcon_jax.cli import UserValueError

log = logging.getLogger(__name__)

# EuroSAT's 13-band GeoTIFFs (read unchanged by TFDS) hold B8A last
# (phelber/EuroSAT#7, torchgeo#2458).
EUROSAT_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12",
                 "B8A"]
BIGEARTHNET_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                     "B11", "B12"]
BIGEARTHNET_SIZE = 120  # 10 m grid of a BigEarthNet patch

# The 19-class BigEarthNet nomenclature (Sumbul et al. 2021) that SSL4EO-S12 and SoftCon
# report on: TFDS's 43 CORINE names -> 19 classes; the 11 other names have no class.
BEN19_CLASSES = [
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops",
    "Pastures", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation", "Transitional woodland, shrub",
    "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands", "Inland waters",
    "Marine waters"]
BEN43_TO_19 = {
    "Continuous urban fabric": 0, "Discontinuous urban fabric": 0,
    "Industrial or commercial units": 1,
    "Non-irrigated arable land": 2, "Permanently irrigated land": 2, "Rice fields": 2,
    "Vineyards": 3, "Fruit trees and berry plantations": 3, "Olive groves": 3,
    "Annual crops associated with permanent crops": 3,
    "Pastures": 4, "Complex cultivation patterns": 5,
    "Land principally occupied by agriculture, with significant areas of natural "
    "vegetation": 6,
    "Agro-forestry areas": 7, "Broad-leaved forest": 8, "Coniferous forest": 9,
    "Mixed forest": 10, "Natural grassland": 11, "Sparsely vegetated areas": 11,
    "Moors and heathland": 12, "Sclerophyllous vegetation": 12,
    "Transitional woodland/shrub": 13, "Beaches, dunes, sands": 14,
    "Inland marshes": 15, "Peatbogs": 15, "Salt marshes": 16, "Salines": 16,
    "Water courses": 17, "Water bodies": 17,
    "Coastal lagoons": 18, "Estuaries": 18, "Sea and ocean": 18,
}


def _tfds():
    """Imports tensorflow-datasets (needs TensorFlow: the `eval` extra), TF kept off GPUs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("Downstream evaluation reads tensorflow-datasets, which needs "
                          "TensorFlow: pip install 'softcon-jax[eval]' (tensorflow-cpu).") from e
    try:  # a GPU build of TensorFlow would otherwise reserve the accelerator's memory
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    return tf, tfds


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one TFDS dataset into (raw band dict, target) batches."""

    name: str                 # TFDS name/config
    train_split: str
    test_split: str
    multilabel: bool
    # (tf example) -> (dict of tensors to batch); runs inside tf.data.map
    select: Callable
    # (numpy batch) -> (canonical band -> (B, H, W) float32 raw values, targets)
    to_bands: Callable


def _eurosat_select(tf, num_classes):
    def fn(ex):
        return {"image": ex["sentinel2"], "target": ex["label"]}
    return fn


def _eurosat_to_bands(batch: dict, label_set: str,
                      ben19: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    img = np.asarray(batch["image"], np.float32)  # (B, 64, 64, 13), TIFF band order
    bands = {b: img[..., i] for i, b in enumerate(EUROSAT_BANDS)}
    return bands, np.asarray(batch["target"], np.int64)


def _bigearthnet_select(tf, num_classes):
    def fn(ex):
        # Variable-length class ids -> multi-hot over the 43 TFDS classes.
        hot = tf.reduce_sum(tf.one_hot(ex["labels"], num_classes, dtype=tf.float32), axis=0)
        out = {b: ex[b] for b in BIGEARTHNET_BANDS}
        out["target"] = tf.minimum(hot, 1.0)
        return out
    return fn


def _upsample_batch(x: np.ndarray, size: int) -> np.ndarray:
    """(B, h, w) -> (B, size, size), bilinear with torch coordinates (as the data pipeline)."""
    if x.shape[1] == size and x.shape[2] == size:
        return np.asarray(x, np.float32)
    moved = np.moveaxis(np.asarray(x, np.float32), 0, -1)  # (h, w, B)
    return np.moveaxis(augment.resize_bilinear(moved, (size, size)), -1, 0)


def _ben19_matrix(names: list[str]) -> np.ndarray:
    unknown = sorted(set(BEN43_TO_19) - set(names))
    if unknown:
        raise UserValueError(f"bigearthnet: TFDS label names lack {unknown}; cannot map to the "
                             "19-class nomenclature (use --label-set 43).")
    m = np.zeros((len(names), len(BEN19_CLASSES)), np.float32)
    for i, n in enumerate(names):
        if n in BEN43_TO_19:
            m[i, BEN43_TO_19[n]] = 1.0
    return m


def _bigearthnet_to_bands(batch: dict, label_set: str,
                          ben19: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    # Every band bilinearly to the 10 m grid (120 px) first, as BigEarthNet loaders do.
    bands = {canonical_band(b): _upsample_batch(batch[b], BIGEARTHNET_SIZE)
             for b in BIGEARTHNET_BANDS}
    target = np.asarray(batch["target"], np.float32)
    if label_set == "19":
        target = np.minimum(target @ ben19, 1.0)
    return bands, target


DATASETS = {
    "eurosat": DatasetSpec("eurosat/all", "train[:80%]", "train[80%:]", False,
                           _eurosat_select, _eurosat_to_bands),
    "bigearthnet": DatasetSpec("bigearthnet/all", "train[:80%]", "train[80%:]", True,
                               _bigearthnet_select, _bigearthnet_to_bands),
}


@dataclasses.dataclass
class EvalOptions:
    """Everything a task needs besides the backbone (the CLI flags)."""

    train_fraction: float | None = None  # None: the task's default
    seed: int = 0
    batch_size: int = 256
    data_dir: str | None = None
    train_split: str | None = None
    test_split: str | None = None
    label_set: str = "19"                # BigEarthNet: '19' or '43' classes
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_weighting: str = "dino"
    probe_epochs: int = 100
    probe_lr: float = 1e-2
    probe_weight_decay: float = 1e-4
    probe_batch_size: int = 256
    max_examples: int | None = None      # cap per split (smoke runs)


@dataclasses.dataclass
class Split:
    features: np.ndarray  # (N, D) float32
    targets: np.ndarray   # (N,) int64 or (N, C) float32
    num_classes: int


def _subsample_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Exactly round(n * fraction) (at least 1) of n indices, chosen by a seeded permutation."""
    keep = np.zeros(n, bool)
    keep[np.random.default_rng(seed).permutation(n)[:max(1, int(round(n * fraction)))]] = True
    return keep


class FeatureExtractor:
    """Jitted eval-mode features over all local devices (data parallel), fixed batch size."""

    def __init__(self, backbone: Backbone, batch_size: int):
        if backbone.features_fn is None:
            raise UserValueError("Backbone.features_fn is None; build the Backbone with "
                                 "softcon_jax.pretrained (or pass a feature function).")
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("batch",))
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.backbone = backbone
        self._features = backbone.features_fn
        used = {k: v for k, v in backbone.variables.items() if k in ("params", "batch_stats")}
        self.variables = jax.device_put(used, NamedSharding(self.mesh, P()))
        self._sharding = NamedSharding(self.mesh, P("batch"))
        size = backbone.img_size
        # antialias=False: the same bilinear resize as the pretraining data pipeline
        # (softcon_jax.data.augment.resize_bilinear, torch coordinates).
        self._resize = jax.jit(lambda x: jax.image.resize(
            x, (x.shape[0], size, size, x.shape[3]), "bilinear", antialias=False))

    def __call__(self, x: np.ndarray) -> jax.Array:
        """(n <= batch_size, H, W, C) normalised input -> (n, D) features (on device, async)."""
        n = x.shape[0]
        if n < self.batch_size:  # pad: one compilation for every batch
            x = np.concatenate([x, np.zeros((self.batch_size - n,) + x.shape[1:], x.dtype)])
        x = jax.device_put(x, self._sharding)
        if x.shape[1] != self.backbone.img_size or x.shape[2] != self.backbone.img_size:
            x = self._resize(x)
        return self._features(self.variables, x)[:n]


def _check_scale(bands: dict, dataset: str, warned: list) -> None:
    """Warns once when optical values look like reflectance in [0, 1] instead of x 10000."""
    if warned:
        return
    warned.append(True)
    optical = [v for b, v in bands.items() if b in ("B2", "B3", "B4", "B8")]
    if optical and float(np.median(np.stack(optical))) < 5.0:
        log.warning("%s: optical bands have median %.3g; the pretraining statistics expect "
                    "reflectance x 10000 (as TFDS stores EuroSAT and BigEarthNet). Random "
                    "mock data also looks like this.", dataset,
                    float(np.median(np.stack(optical))))


def extract_split(spec: DatasetSpec, split: str, backbone: Backbone, opts: EvalOptions,
                  extractor: FeatureExtractor, fraction: float = 1.0) -> Split:
    """Streams one TFDS split through preprocessing and the backbone; keeps only features."""
    tf, tfds = _tfds()
    try:
        builder = tfds.builder(spec.name, data_dir=opts.data_dir)
        ds = tfds.load(spec.name, split=split, data_dir=opts.data_dir, download=False,
                       shuffle_files=False)
    except Exception as e:  # TFDS raises several types for "not prepared"
        raise FileNotFoundError(
            f"TFDS dataset {spec.name!r} (split {split!r}) could not be read from "
            f"--data-dir={opts.data_dir or '~/tensorflow_datasets'}: {e}. Prepare it once "
            f"(it is not downloaded here): tfds build {spec.name} --data_dir DIR "
            f"(BigEarthNet needs apache-beam).") from e
    label_feature = builder.info.features["labels" if spec.multilabel else "label"]
    if spec.multilabel:
        label_feature = label_feature.feature
    num_classes = label_feature.num_classes
    ben19 = None
    if spec.multilabel and opts.label_set == "19":
        ben19 = _ben19_matrix(list(label_feature.names))
        out_classes = len(BEN19_CLASSES)
    else:
        out_classes = num_classes

    n = int(ds.cardinality())
    if opts.max_examples:
        ds = ds.take(opts.max_examples)
        n = min(n, opts.max_examples) if n >= 0 else opts.max_examples
    if fraction < 1.0:
        if n < 0:
            raise UserValueError(f"{spec.name} {split}: unknown size; cannot subsample "
                                 f"--train-fraction={fraction}.")
        mask = _subsample_mask(n, fraction, opts.seed)
        keep = tf.constant(mask)

        def kept(i, ex):
            return tf.gather(keep, i)

        def drop_index(i, ex):
            return ex

        ds = ds.enumerate().filter(kept).map(drop_index)
        n = int(mask.sum())
    ds = ds.map(spec.select(tf, num_classes), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(extractor.batch_size).prefetch(tf.data.AUTOTUNE)

    from tqdm import tqdm
    feats, targets, warned = [], [], []
    total = -(-n // extractor.batch_size) if n > 0 else None
    for batch in tqdm(tfds.as_numpy(ds), total=total, desc=f"{spec.name} {split}",
                      disable=None):
        bands, target = spec.to_bands(batch, opts.label_set, ben19)
        _check_scale(bands, spec.name, warned)
        feats.append(extractor(model_input(bands, backbone, spec.name)))  # async dispatch
        targets.append(target)
    if not feats:
        raise UserValueError(f"{spec.name} split {split!r} is empty.")
    return Split(np.concatenate([np.asarray(f, np.float32) for f in feats]),
                 np.concatenate(targets), out_classes)
