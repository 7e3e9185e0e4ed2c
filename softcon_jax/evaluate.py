"""Downstream evaluation of a frozen backbone: kNN and linear probes on EuroSAT / BigEarthNet.

    python -m softcon_jax.evaluate --workdir runs/quickstart --task eurosat_knn
    python -m softcon_jax.evaluate --weights export/backbone.safetensors \
        --task bigearthnet_linear --train-fraction 0.1 --out results.json --data-dir ~/tfds

The backbone comes from a training workdir (teacher of the latest or `--step` checkpoint) or
from an exported `.safetensors` file with its JSON sidecar. Images come from
tensorflow-datasets (prepared once by the user; nothing is downloaded here), are put in the
model's band order, normalised exactly as in pretraining and resized to the model's input
size; features are extracted in jitted batches (`interop.backbone_features`). Then:

- kNN (`*_knn`): cosine similarity on L2-normalised features, the k = 20 nearest training
  samples vote with weight exp(sim / 0.07) (DINO's weighted kNN; `--knn-weighting majority`
  gives plain majority voting).
- Linear probe (`*_linear`): logistic regression on standardised features (train-set
  mean / std), AdamW with a cosine schedule, minibatches; softmax cross-entropy for EuroSAT,
  per-class sigmoid BCE for BigEarthNet (multi-label).

Metrics: EuroSAT top-1 accuracy; BigEarthNet micro and macro mAP (`mean_average_precision`).
Results go to JSON (`--out`) and TensorBoard (`eval/<task>/<metric>` at the checkpoint step).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from softcon_jax.data import augment, normalize

log = logging.getLogger(__name__)

# ==== Metrics ==============================================================================


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of one class: mean over positives of the precision at their score.

    AP = sum_t (R_t - R_{t-1}) P_t over the distinct score thresholds t, highest first
    (no interpolation; tied scores form one threshold), which is scikit-learn's
    `average_precision_score`. Sort-based: O(n log n). NaN when there is no positive.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0
    num_pos = int(labels.sum())
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    # Last index of every run of tied scores: the thresholds.
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp_t = tp[last].astype(np.float64)
    precision = tp_t / (last + 1)
    recall_gain = np.diff(np.r_[0.0, tp_t]) / num_pos
    return float(np.sum(recall_gain * precision))


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Micro and macro mAP of (N, C) scores against (N, C) multi-hot labels.

    micro: one AP over all N x C (score, label) pairs. macro: the mean of the per-class APs
    over the classes that have at least one positive (others are excluded, not zero).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"mean_average_precision: scores {scores.shape} and labels "
                         f"{labels.shape} must both be (N, C).")
    per_class = np.array([average_precision(scores[:, c], labels[:, c])
                          for c in range(scores.shape[1])])
    valid = ~np.isnan(per_class)
    return {"map_micro": average_precision(scores, labels),
            "map_macro": float(per_class[valid].mean()) if valid.any() else float("nan"),
            "num_classes_evaluated": int(valid.sum())}


def top1_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose highest score is at the integer label."""
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(labels)))


# ==== kNN ==================================================================================


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_scores(bank: jax.Array, bank_targets: jax.Array, queries: jax.Array, *, k: int = 20,
               temperature: float = 0.07, weighting: str = "dino") -> jax.Array:
    """Class scores (M, C) of `queries` (M, D) from their k nearest `bank` rows (N, D).

    Cosine similarity; each neighbour adds its target row (one-hot or multi-hot, (N, C)),
    weighted by exp(sim / temperature) (`weighting='dino'`, as DINO's `knn_classifier`) or
    by 1 (`'majority'`). Pure jnp: usable inside jit.
    """
    if weighting not in ("dino", "majority"):
        raise ValueError(f"knn weighting={weighting!r}; expected 'dino' or 'majority'.")
    sim = l2_normalize(queries) @ l2_normalize(bank).T
    top_sim, top_idx = jax.lax.top_k(sim, min(k, bank.shape[0]))
    weights = jnp.exp(top_sim / temperature) if weighting == "dino" else jnp.ones_like(top_sim)
    return jnp.einsum("mk,mkc->mc", weights, bank_targets.astype(jnp.float32)[top_idx])


_knn_scores_jit = jax.jit(knn_scores, static_argnames=("k", "weighting"))


def knn_scores_chunked(bank: np.ndarray, bank_targets: np.ndarray, queries: np.ndarray, *,
                       k: int, temperature: float, weighting: str,
                       chunk: int = 1024) -> np.ndarray:
    """`knn_scores` over query chunks of a fixed size (one compilation, bounded memory)."""
    bank, targets = jnp.asarray(bank), jnp.asarray(bank_targets, jnp.float32)
    chunk = min(chunk, len(queries))
    out = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        n = len(q)
        if n < chunk:
            q = np.concatenate([q, np.zeros((chunk - n,) + q.shape[1:], q.dtype)])
        out.append(np.asarray(_knn_scores_jit(bank, targets, jnp.asarray(q), k=k,
                                              temperature=temperature,
                                              weighting=weighting))[:n])
    return np.concatenate(out)


# ==== Linear probe =========================================================================


@dataclasses.dataclass
class LinearProbe:
    """Logistic regression on standardised features: logits = ((x - mean) / std) @ w + b."""

    w: np.ndarray
    b: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    final_loss: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std) @ self.w + self.b


def train_linear_probe(x: np.ndarray, y: np.ndarray, *, num_classes: int, multilabel: bool,
                       epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4,
                       batch_size: int = 256, seed: int = 0,
                       min_steps: int = 2000) -> LinearProbe:
    """Trains a linear classifier on frozen features with optax.

    x (N, D) features; y (N,) integer labels, or (N, C) multi-hot when `multilabel`.
    Minibatches of `batch_size` (the whole set when N is smaller), a fresh permutation per
    epoch (one jitted `lax.scan` per epoch), AdamW (no decay on the bias), cosine decay
    from `lr` to 0. Small training sets get more epochs, so that there are at least
    `min_steps` updates. Loss: softmax cross-entropy, or mean per-class sigmoid BCE.
    """
    x = np.asarray(x, np.float32)
    n, d = x.shape
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = (x.std(axis=0, dtype=np.float64) + 1e-6).astype(np.float32)
    xs = jnp.asarray((x - mean) / std)
    ys = jnp.asarray(y, jnp.float32 if multilabel else jnp.int32)
    bs = min(batch_size, n)
    steps = max(n // bs, 1)
    epochs = max(epochs, -(-min_steps // steps))
    tx = optax.adamw(optax.cosine_decay_schedule(lr, epochs * steps),
                     weight_decay=weight_decay, mask={"w": True, "b": False})
    params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        logits = xb @ p["w"] + p["b"]
        if multilabel:
            return optax.sigmoid_binary_cross_entropy(logits, yb).mean()
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run_epoch(params, opt_state, xs, ys, key):
        batches = jax.random.permutation(key, n)[:steps * bs].reshape(steps, bs)

        def step(carry, idx):
            p, s = carry
            loss, grads = jax.value_and_grad(loss_fn)(p, xs[idx], ys[idx])
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, losses.mean()

    key = jax.random.key(seed)
    loss = jnp.nan
    for epoch in range(epochs):
        params, opt_state, loss = run_epoch(params, opt_state, xs, ys,
                                            jax.random.fold_in(key, epoch))
    return LinearProbe(np.asarray(params["w"]), np.asarray(params["b"]), mean, std,
                       float(loss))


# ==== Backbone and its input specification =================================================

SECO_INPUT_SCALE = 255.0 / 10000.0

# Bands whose absence in a dataset is filled with zeros (after normalisation): B10 (cirrus)
# is not in L2A products such as BigEarthNet; SoftCon feeds such data to its 13-band models
# with a zero B10 band.
ZERO_FILL_BANDS = ("B10",)


def canonical_band(name: str) -> str:
    """'B01' -> 'B1', 'B08A'/'b8a' -> 'B8A'; other names (VV, VH) unchanged."""
    m = re.fullmatch(r"[Bb]0*(\d+)([Aa]?)", name)
    return f"B{m.group(1)}{m.group(2).upper()}" if m else name


@dataclasses.dataclass
class Backbone:
    """A frozen backbone and what its input must look like."""

    model: Any
    variables: dict
    band_order: list[str]          # canonical band names, model channel order
    normalizer: normalize.Normalizer
    normalization: dict            # JSON description (name, stats) for the results file
    img_size: int
    step: int
    source: str
    # Multiplies the datasets' raw values (reflectance x 10000) before normalisation:
    # 1 for SSL4EO-S12-style pretraining data (uint16, x 10000), 255 / 10000 for SeCo's
    # uint8 data (reflectance x 255).
    input_scale: float = 1.0


def _default_bands(in_channels: int, where: str) -> list[str]:
    defaults = {13: normalize.S2C_BANDS, 12: normalize.S2A_BANDS, 2: ["VV", "VH"]}
    if in_channels not in defaults:
        raise ValueError(f"{where}: no band order recorded and no default for "
                         f"{in_channels} input channels; pass --bands.")
    log.warning("%s: no band order recorded; assuming %s.", where, defaults[in_channels])
    return list(defaults[in_channels])


def _checked_bands(bands: list[str], model: Any, where: str) -> list[str]:
    if len(bands) != model.in_channels:
        raise ValueError(f"{where}: band order {list(bands)} has {len(bands)} bands but the "
                         f"model has {model.in_channels} input channels.")
    return [canonical_band(b) for b in bands]


def _make_normalizer(name: str | None, stats: Any, bands: list[str], where: str,
                     per_band: dict | None = None, quantize: bool = False
                     ) -> normalize.Normalizer:
    if not name:
        raise ValueError(f"{where}: no input normalisation recorded; pass --normalization "
                         f"(one of {normalize.METHODS}) and --stats.")
    if isinstance(stats, str) and stats in normalize.STATS:
        return normalize.make_normalizer(name, stats, bands, quantize=quantize)
    if per_band:  # measured statistics recorded in the sidecar
        return normalize.make_normalizer(name, dict(per_band), bands, quantize=quantize)
    raise ValueError(f"{where}: normalisation stats {stats!r} are not a preset "
                     f"({sorted(normalize.STATS)}) and no per-band table is recorded; "
                     f"pass --stats.")


def _input_scale(stats: Any, data_dtype: str | None) -> float:
    return SECO_INPUT_SCALE if stats == "seco" or data_dtype == "uint8" else 1.0


def load_from_workdir(workdir: str, step: int | None = None, which: str = "teacher", *,
                      normalization: str | None = None, stats: str | None = None,
                      bands: list[str] | None = None, input_scale: float | None = None,
                      quantize_uint8: bool | None = None) -> Backbone:
    """The teacher (or student) backbone of a training checkpoint and its pretraining input.

    `quantize_uint8` (default `config.data.quantize_uint8`): the references' uint8 step
    before /255 (`softcon_jax.data.normalize`).

    Band order: `config.data.bands`, else the training data's metadata.json. Normalisation:
    `config.data.normalization` / `.stats`; `stats='dataset'` re-measures the statistics on
    the training data exactly as the data pipeline did (it must still be readable). Input
    scale: SeCo-style uint8 training data (metadata dtype, or stats='seco') -> 255 / 10000.
    """
    from softcon_jax import data as data_lib
    from softcon_jax.export import restore_backbone

    model, variables, config, step = restore_backbone(workdir, step, which)
    d = config.data
    where = f"--workdir {workdir} (config.data)"
    try:
        meta = data_lib.load_metadata(d.path)[0]
    except FileNotFoundError:
        meta = {}
    if bands is None:
        if d.get("bands"):
            bands = [d.bands] if isinstance(d.bands, str) else list(d.bands)
        elif meta.get("bands"):
            bands = list(meta["bands"])
        else:
            bands = _default_bands(int(d.in_channels), where)
    bands = _checked_bands(bands, model, where)
    name = normalization or d.normalization
    stats = stats or d.get("stats")
    if quantize_uint8 is None:
        quantize_uint8 = bool(d.get("quantize_uint8", False))
    if stats == "dataset":
        meta, meta_path = data_lib.load_metadata(d.path)
        d = d.copy_and_resolve_references()
        with d.unlocked():  # checkpoints from before the key existed
            d.quantize_uint8 = bool(quantize_uint8)
        normalizer = data_lib.build_views_transform(d, meta, meta_path).normalizer
    else:
        normalizer = _make_normalizer(name, stats, bands, where, quantize=quantize_uint8)
    if input_scale is None:
        input_scale = _input_scale(stats, meta.get("dtype"))
    return Backbone(model, variables, bands, normalizer,
                    {"name": name, "stats": stats}, int(d.image_size), int(step),
                    os.path.abspath(workdir), float(input_scale))


def _arch_kwargs(timm_kwargs: dict) -> dict:
    """timm keyword arguments (sidecar) -> `build_backbone` overrides."""
    renames = {"layers": "stage_sizes", "channels": "widths"}
    return {renames.get(k, k): v for k, v in timm_kwargs.items()
            if k not in ("in_chans", "img_size")}


def load_from_weights(path: str, *, normalization: str | None = None,
                      stats: str | None = None, bands: list[str] | None = None,
                      img_size: int | None = None, step: int | None = None,
                      input_scale: float | None = None,
                      quantize_uint8: bool | None = None) -> Backbone:
    """A backbone exported by `softcon_jax.export` (or `interop.export_torch`).

    `quantize_uint8` (default: the sidecar's `normalization.quantize_uint8`, else False):
    truncate to uint8 before /255 as the SSL4EO-S12 / SoftCon and SeCo readers do, to
    evaluate released weights on the input their authors fed them.

    Reads `<path>.json` (timm_name, timm_kwargs, in_chans, img_size, band_order,
    normalization) and imports the weights with `interop.import_torch`.
    """
    from softcon_jax import interop

    sidecar_path = f"{path}.json"
    if not os.path.exists(path):
        raise FileNotFoundError(f"--weights {path}: no such file.")
    if not os.path.exists(sidecar_path):
        raise FileNotFoundError(f"--weights {path}: its sidecar {sidecar_path} is missing; "
                                "export with python -m softcon_jax.export, which writes it.")
    meta = json.loads(open(sidecar_path).read())
    for key in ("timm_name", "in_chans"):
        if key not in meta:
            raise ValueError(f"{sidecar_path}: missing key {key!r}.")
    arch, in_chans = meta["timm_name"], int(meta["in_chans"])
    vit = arch.startswith("vit")
    size = img_size or meta.get("img_size") or 224
    if vit and meta.get("img_size") and img_size and img_size != meta["img_size"]:
        raise ValueError(f"--img-size {img_size}: {arch} in {path} was built for "
                         f"img_size={meta['img_size']}.")
    model, variables = interop.import_torch(path, arch, in_chans, img_size=int(size),
                                            **_arch_kwargs(meta.get("timm_kwargs", {})))
    where = f"--weights {path} ({sidecar_path})"
    bands = _checked_bands(bands or meta.get("band_order") or _default_bands(in_chans, where),
                           model, where)
    norm = meta.get("normalization") or {}
    if isinstance(norm, str):
        norm = {"name": norm}
    name = normalization or norm.get("name")
    stats = stats or norm.get("stats")
    per_band = norm.get("per_band") if not stats or stats == norm.get("stats") else None
    if quantize_uint8 is None:
        quantize_uint8 = bool(norm.get("quantize_uint8", False))
    normalizer = _make_normalizer(name, stats, bands, where, per_band, quantize_uint8)
    if input_scale is None:
        input_scale = meta.get("input_scale") or _input_scale(stats, meta.get("data_dtype"))
    return Backbone(model, variables, bands, normalizer,
                    {"name": name, "stats": stats}, int(size),
                    int(step if step is not None else meta.get("step", 0) or 0),
                    os.path.abspath(path), float(input_scale))


def model_input(bands: dict[str, np.ndarray], backbone: Backbone,
                dataset: str) -> np.ndarray:
    """Dataset bands (canonical name -> (B, H, W) raw values) -> (B, H, W, C) model input.

    Bands are stacked in the model's order, multiplied by `backbone.input_scale`, normalised
    with the pretraining normaliser, and bands in `ZERO_FILL_BANDS` that the dataset lacks
    are then set to 0.
    """
    missing = [b for b in backbone.band_order if b not in bands]
    bad = [b for b in missing if b not in ZERO_FILL_BANDS]
    if bad:
        raise ValueError(f"{dataset} has no band(s) {bad} that the model needs (model bands "
                         f"{backbone.band_order}, dataset bands {sorted(bands)}).")
    shape = next(iter(bands.values())).shape
    x = np.stack([bands[b] if b in bands else np.zeros(shape, np.float32)
                  for b in backbone.band_order], axis=-1)
    if backbone.input_scale != 1.0:
        x *= np.float32(backbone.input_scale)
    x = backbone.normalizer(x)
    for b in missing:
        x[..., backbone.band_order.index(b)] = 0.0
    return x


# ==== Datasets (tensorflow-datasets) =======================================================

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
        raise ValueError(f"bigearthnet: TFDS label names lack {unknown}; cannot map to the "
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
        from softcon_jax import interop

        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("batch",))
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.backbone = backbone
        self._features = interop.backbone_features
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
        return self._features(self.backbone.model, self.variables, x)[:n]


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
            raise ValueError(f"{spec.name} {split}: unknown size; cannot subsample "
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
        raise ValueError(f"{spec.name} split {split!r} is empty.")
    return Split(np.concatenate([np.asarray(f, np.float32) for f in feats]),
                 np.concatenate(targets), out_classes)


# ==== Tasks ================================================================================

TASKS: dict[str, Callable[[Backbone, EvalOptions], dict]] = {}
DEFAULT_TRAIN_FRACTION = {"bigearthnet_linear": 0.1, "bigearthnet_knn": 0.1}


def register_task(name: str):
    """Decorator adding `fn(backbone, options) -> result dict` to `TASKS`."""
    def deco(fn):
        TASKS[name] = fn
        return fn
    return deco


def _train_test(dataset: str, task: str, backbone: Backbone,
                opts: EvalOptions) -> tuple[Split, Split, dict]:
    spec = DATASETS[dataset]
    fraction = opts.train_fraction
    if fraction is None:
        fraction = DEFAULT_TRAIN_FRACTION.get(task, 1.0)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--train-fraction={fraction}: expected a value in (0, 1].")
    train_split = opts.train_split or spec.train_split
    test_split = opts.test_split or spec.test_split
    extractor = FeatureExtractor(backbone, opts.batch_size)
    train = extract_split(spec, train_split, backbone, opts, extractor, fraction)
    test = extract_split(spec, test_split, backbone, opts, extractor)
    info = {"dataset": spec.name, "train_split": train_split, "test_split": test_split,
            "train_fraction": fraction, "num_train": int(len(train.targets)),
            "num_test": int(len(test.targets)), "num_classes": train.num_classes}
    if spec.multilabel:
        info["label_set"] = opts.label_set
    return train, test, info


def _targets_matrix(split: Split) -> np.ndarray:
    if split.targets.ndim == 2:
        return split.targets.astype(np.float32)
    return np.eye(split.num_classes, dtype=np.float32)[split.targets]


def _knn_task(dataset: str, task: str, backbone: Backbone, opts: EvalOptions) -> dict:
    train, test, info = _train_test(dataset, task, backbone, opts)
    scores = knn_scores_chunked(train.features, _targets_matrix(train), test.features,
                                k=opts.knn_k, temperature=opts.knn_temperature,
                                weighting=opts.knn_weighting)
    metrics = (mean_average_precision(scores, test.targets) if test.targets.ndim == 2
               else {"top1": top1_accuracy(scores, test.targets)})
    info["knn"] = {"k": opts.knn_k, "temperature": opts.knn_temperature,
                   "weighting": opts.knn_weighting}
    return {"metrics": metrics, **info}


def _linear_task(dataset: str, task: str, backbone: Backbone, opts: EvalOptions) -> dict:
    train, test, info = _train_test(dataset, task, backbone, opts)
    multilabel = train.targets.ndim == 2
    probe = train_linear_probe(train.features, train.targets, num_classes=train.num_classes,
                               multilabel=multilabel, epochs=opts.probe_epochs,
                               lr=opts.probe_lr, weight_decay=opts.probe_weight_decay,
                               batch_size=opts.probe_batch_size, seed=opts.seed)
    logits = probe.logits(test.features)
    if multilabel:
        metrics = mean_average_precision(logits, test.targets)  # sigmoid is monotonic
    else:
        metrics = {"top1": top1_accuracy(logits, test.targets)}
    metrics["train_loss"] = probe.final_loss
    info["probe"] = {"epochs": opts.probe_epochs, "lr": opts.probe_lr,
                     "weight_decay": opts.probe_weight_decay,
                     "batch_size": opts.probe_batch_size, "optimizer": "adamw+cosine",
                     "features": "standardised (train mean/std)"}
    return {"metrics": metrics, **info}


register_task("eurosat_knn")(functools.partial(_knn_task, "eurosat", "eurosat_knn"))
register_task("eurosat_linear")(functools.partial(_linear_task, "eurosat", "eurosat_linear"))
register_task("bigearthnet_knn")(
    functools.partial(_knn_task, "bigearthnet", "bigearthnet_knn"))
register_task("bigearthnet_linear")(
    functools.partial(_linear_task, "bigearthnet", "bigearthnet_linear"))


def available_tasks() -> list[str]:
    return sorted(TASKS)


# ==== Run and write results ================================================================


def write_tensorboard(logdir: str, task: str, step: int, metrics: dict) -> None:
    """Scalars `eval/<task>/<metric>` at `step` (tensorboardX)."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir)
    try:
        for name, value in metrics.items():
            if isinstance(value, float) and np.isfinite(value):  # counts stay in the JSON
                writer.add_scalar(f"eval/{task}/{name}", float(value), step)
    finally:
        writer.close()


def evaluate(backbone: Backbone, task: str, opts: EvalOptions) -> dict:
    """Runs `task` on `backbone`; returns the result record (metrics + provenance)."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: unknown; available: {available_tasks()}.")
    t0 = time.perf_counter()
    result = TASKS[task](backbone, opts)
    return {"task": task, "step": backbone.step, "source": backbone.source, **result,
            "input": {"band_order": backbone.band_order, "img_size": backbone.img_size,
                      "normalization": backbone.normalization,
                      "input_scale": backbone.input_scale,
                      "zero_filled_after_normalisation": [
                          b for b in backbone.band_order if b in ZERO_FILL_BANDS]},
            "seed": opts.seed, "time_s": round(time.perf_counter() - t0, 2)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m softcon_jax.evaluate",
        description="kNN / linear-probe evaluation of a frozen backbone on TFDS datasets.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (checkpoints/)")
    src.add_argument("--weights", help="exported .safetensors (with its .json sidecar)")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step (default: latest); with --weights, the TensorBoard step")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--task", required=True, choices=available_tasks())
    p.add_argument("--train-fraction", type=float, default=None,
                   help="seeded subsample of the training split (default: 0.1 for "
                        "BigEarthNet, as the paper; 1.0 for EuroSAT)")
    p.add_argument("--out", default=None, help="results JSON (default: WORKDIR/eval/"
                   "<task>_step<N>.json or <weights>.<task>.json)")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir with prepared datasets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    p.add_argument("--train-split", default=None, help="TFDS split (default train[:80%%])")
    p.add_argument("--test-split", default=None, help="TFDS split (default train[80%%:])")
    p.add_argument("--label-set", choices=["19", "43"], default="19",
                   help="BigEarthNet classes: the 19-class nomenclature or TFDS's 43")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-temperature", type=float, default=0.07)
    p.add_argument("--knn-weighting", choices=["dino", "majority"], default="dino")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--probe-weight-decay", type=float, default=1e-4)
    p.add_argument("--probe-batch-size", type=int, default=256)
    p.add_argument("--max-examples", type=int, default=None,
                   help="read at most this many examples per split (smoke tests)")
    p.add_argument("--normalization", choices=list(normalize.METHODS), default=None,
                   help="override the recorded input normalisation")
    p.add_argument("--stats", choices=sorted(normalize.STATS), default=None,
                   help="override the recorded normalisation statistics")
    p.add_argument("--bands", default=None,
                   help="comma-separated model band order, e.g. B1,B2,...,B12 (default: "
                        "as recorded in the checkpoint's data or the sidecar)")
    p.add_argument("--input-scale", type=float, default=None,
                   help="multiply the datasets' values (reflectance x 10000) by this before "
                        "normalising (default: 1, or 255/10000 for SeCo uint8 pretraining)")
    p.add_argument("--quantize-uint8", action=argparse.BooleanOptionalAction, default=None,
                   help="truncate the normalised input to uint8 before /255, as the "
                        "SSL4EO-S12 / SoftCon and SeCo readers (default: as in training, "
                        "config.data.quantize_uint8, or the sidecar; else off)")
    p.add_argument("--img-size", type=int, default=None,
                   help="--weights only: input size when the sidecar has none (ResNet)")
    p.add_argument("--tensorboard-dir", default=None,
                   help="default: WORKDIR/tensorboard, else <dir of --out>/tensorboard")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    bands = args.bands.split(",") if args.bands else None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.workdir:
        backbone = load_from_workdir(args.workdir, args.step, args.which,
                                     normalization=args.normalization, stats=args.stats,
                                     bands=bands, input_scale=args.input_scale,
                                     quantize_uint8=args.quantize_uint8)
        out = args.out or os.path.join(args.workdir, "eval",
                                       f"{args.task}_step{backbone.step}.json")
        tb_dir = args.tensorboard_dir or os.path.join(args.workdir, "tensorboard")
    else:
        backbone = load_from_weights(args.weights, normalization=args.normalization,
                                     stats=args.stats, bands=bands, img_size=args.img_size,
                                     step=args.step, input_scale=args.input_scale,
                                     quantize_uint8=args.quantize_uint8)
        out = args.out or f"{args.weights}.{args.task}.json"
        tb_dir = args.tensorboard_dir or os.path.join(
            os.path.dirname(os.path.abspath(out)), "tensorboard")
    opts = EvalOptions(
        train_fraction=args.train_fraction, seed=args.seed, batch_size=args.batch_size,
        data_dir=args.data_dir, train_split=args.train_split, test_split=args.test_split,
        label_set=args.label_set, knn_k=args.knn_k, knn_temperature=args.knn_temperature,
        knn_weighting=args.knn_weighting, probe_epochs=args.probe_epochs,
        probe_lr=args.probe_lr, probe_weight_decay=args.probe_weight_decay,
        probe_batch_size=args.probe_batch_size, max_examples=args.max_examples)
    result = evaluate(backbone, args.task, opts)
    result["tensorboard_dir"] = os.path.abspath(tb_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    write_tensorboard(tb_dir, args.task, backbone.step, result["metrics"])
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()
                      if isinstance(v, float))
    print(f"{args.task} (step {backbone.step}): {shown} -> {out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:  # user errors: no traceback
        raise SystemExit(f"error: {e}") from None
