"""Online kNN monitor: representation quality on a held-out labelled split while pretraining.

Every `config.eval.every_steps` steps the teacher backbone embeds a fixed set of held-out
images (ArrayRecord shards written by `data_prep`, e.g. SSL4EO-S12 locations not used for
training, or `data_prep.synthetic` with another seed), and a multi-label kNN predicts each
query image's Dynamic World labels from its `knn_k` nearest bank images:

    scores(q) = sum over the k nearest bank images j of exp(cos(q, j) / T) * labels(j)

(DINO's weighted vote, T = `knn_temperature`, applied to multi-hot labels). Reported:
`eval/knn_top1` (the highest-scored class is one of the query's labels, i.e. precision@1),
`eval/knn_map_micro`, `eval/knn_map_macro` (average precision,
`evaluators.metrics.mean_average_precision`) and `eval/knn_time_s`. Multi-label kNN is used because Dynamic World labels are
multi-hot without class fractions: a "dominant" class is not recorded, and the first listed
class is just the lowest class index.

Samples: records in file order, one sample per location (its first labelled season;
unlabelled locations are skipped): the first `num_train` form the bank, the next `num_val`
the queries, so no location is in both. Images get the pretraining normalisation (the
training data's band selection and statistics) on the full scene, bilinearly resized to
`config.data.image_size`; no augmentation.

Cost: the images are preprocessed once at construction and cached on the devices (sharded
over the batch axes, stored in the model's compute dtype: (num_train + num_val) x S^2 x C
values). Each call is one jitted function (forward passes in a `lax.map` over batches,
then the kNN), compiled once; it is as expensive as (num_train + num_val) / (6 x global
batch) training steps (a training step runs ~6 forward-equivalents per image: student
forward + backward on two views, teacher forward on two). With the defaults (1280 images,
every 500 steps) that is well under 1 % of training time for any batch of 64 or more.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from softcon_jax import data as data_lib
from softcon_jax import defaults
from softcon_jax import sharding as sharding_lib
from softcon_jax.data import augment, records
from softcon_jax.data.source import ensure_synthetic_data
from softcon_jax.evaluators.knn import knn_scores
from softcon_jax.cli import UserValueError
from softcon_jax.evaluators.metrics import mean_average_precision


default_config = defaults.online_eval  # the config.eval defaults


def _labelled_samples(path: str, count: int) -> list[tuple[int, int, np.ndarray]]:
    """(record index, season index, labels (9,)) of the first `count` labelled locations."""
    source = data_lib.open_dataset(path).source
    out = []
    for i in range(len(source)):
        ex = records.decode(source[i])
        labelled = np.nonzero(ex["has_label"] & ex["labels"].any(axis=1))[0]
        if labelled.size:
            t = int(labelled[0])
            out.append((i, t, np.asarray(ex["labels"][t], np.float32)))
            if len(out) == count:
                break
    return out


class OnlineKNN:
    """Periodic kNN evaluation of the backbone during pretraining (see module docstring).

    Construct after the train state; call `maybe_run(step, state)` after every step on
    every process. It returns None, or scalars to log. The monitor knows no method: it
    gets `features_fn(variables, x) -> (B, D)` (eval mode) and `variables_fn(state) ->
    variables` of the backbone to monitor (`for_method` builds both from a method).
    """

    @classmethod
    def for_method(cls, config: Any, mesh: Mesh, method: Any) -> "OnlineKNN":
        cfg = config.get("eval") or default_config()
        which = cfg.get("which", "teacher")

        def features_fn(variables, x):
            return method.backbone.apply(variables, x, train=False)

        def variables_fn(state):
            v = method.backbone_variables(state.model_state, state.params, which)
            return {k: v[k] for k in ("params", "batch_stats") if k in v}

        return cls(config, mesh, features_fn, variables_fn)

    def __init__(self, config: Any, mesh: Mesh, features_fn: Any, variables_fn: Any):
        cfg = config.get("eval") or default_config()
        self.every = int(cfg.get("every_steps", 0) or 0)
        self.enabled = self.every > 0 and bool(cfg.get("data_path"))
        if self.every > 0 and not cfg.get("data_path"):
            logging.info("Online kNN off: config.eval.data_path is empty.")
        if not self.enabled:
            return
        self.cfg, self.mesh = cfg, mesh
        self.features_fn, self.variables = features_fn, variables_fn
        self.k = int(cfg.knn_k)
        if self.k < 1:
            raise UserValueError(f"config.eval.knn_k={self.k}; expected >= 1.")
        self._maybe_write_synthetic(cfg)
        t0 = time.perf_counter()
        images, self.bank_labels, self.val_labels = self._load(config, cfg)
        self.num_train, self.num_val = len(self.bank_labels), len(self.val_labels)
        self.images = self._to_device(images)
        self._run = self._build(float(cfg.knn_temperature))
        logging.info("Online kNN: %d bank / %d query images from %s cached on device in "
                     "%.1f s; runs every %d steps.", self.num_train, self.num_val,
                     cfg.data_path, time.perf_counter() - t0, self.every)

    # --- setup -------------------------------------------------------------------------

    @staticmethod
    def _maybe_write_synthetic(cfg) -> None:
        if not cfg.get("synthetic") or not cfg.synthetic.get("enabled", True):
            return
        spec = cfg.synthetic
        ensure_synthetic_data(ml_collections.ConfigDict(
            {"path": cfg.data_path,
             "synthetic": spec if isinstance(spec, ml_collections.ConfigDict)
             else ml_collections.ConfigDict(dict(spec))}), key="config.eval.synthetic")

    def _load(self, config, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Preprocessed images (N, S, S, C) in bank-then-query order, and their labels."""
        d = config.data
        train_meta, train_meta_path = data_lib.load_metadata(d.path)
        # The pretraining normaliser: same band selection and statistics as training.
        normalizer = data_lib.make_normalizer(d, train_meta, train_meta_path)
        bands = d.get("bands") or train_meta["bands"]
        bands = [bands] if isinstance(bands, str) else list(bands)
        held_out = data_lib.open_dataset(cfg.data_path)
        meta, meta_path = held_out.meta, held_out.meta_path
        missing = [b for b in bands if b not in meta["bands"]]
        if missing:
            raise UserValueError(f"config.eval.data_path={cfg.data_path!r}: bands {missing} of "
                                 f"the training data are not in {meta_path} ({meta['bands']}).")
        index = np.array([meta["bands"].index(b) for b in bands], np.intp)

        want = int(cfg.num_train) + int(cfg.num_val)
        samples = _labelled_samples(cfg.data_path, want)
        n_train = int(cfg.num_train)
        if len(samples) < want:
            if len(samples) < 2:
                raise UserValueError(f"config.eval.data_path={cfg.data_path!r}: "
                                     f"{len(samples)} labelled locations; need at least 2.")
            n_train = len(samples) - max(1, len(samples) // 5)
            logging.warning("Online kNN: %s has %d labelled locations, fewer than "
                            "config.eval.num_train + num_val = %d; using %d / %d.",
                            cfg.data_path, len(samples), want, n_train,
                            len(samples) - n_train)

        size = int(d.image_size)
        dtype = data_lib.input_dtype(config)  # as the training views
        images = np.empty((len(samples), size, size, len(bands)), dtype)
        source = held_out.source
        for row, (i, t, _) in enumerate(samples):
            img = records.decode(source[i])["image"][t][index]  # (C, H, W)
            x = normalizer(img.transpose(1, 2, 0), normalizer.quantile_bounds(img))
            images[row] = augment.resize_bilinear(x, (size, size))
        labels = np.stack([s[2] for s in samples])
        return images, labels[:n_train], labels[n_train:]

    def _to_device(self, images: np.ndarray) -> jax.Array:
        """(N, ...) -> (num_batches, B, ...) global array, batch axis over the mesh."""
        shards = sharding_lib.num_batch_shards(self.mesh)
        b = -(-min(int(self.cfg.batch_size), len(images)) // shards) * shards
        nb = -(-len(images) // b)
        padded = np.zeros((nb * b,) + images.shape[1:], images.dtype)
        padded[:len(images)] = images
        padded = padded.reshape((nb, b) + images.shape[1:])
        spec = NamedSharding(self.mesh, P(None, sharding_lib.BATCH_AXES))
        # Each process fills only its own devices' slices (works on multi-host meshes).
        return jax.make_array_from_callback(padded.shape, spec, lambda idx: padded[idx])

    def _build(self, temperature: float):
        features_fn, mesh = self.features_fn, self.mesh
        n_train, n_val, k = self.num_train, self.num_val, self.k
        bank_labels = jnp.asarray(self.bank_labels)
        batch = sharding_lib.batch_sharding(mesh)

        def run(variables, images):
            def embed(x):
                x = jax.lax.with_sharding_constraint(x, batch)
                return features_fn(variables, x).astype(jnp.float32)

            feats = jax.lax.map(embed, images)
            feats = feats.reshape((-1, feats.shape[-1]))
            scores = knn_scores(feats[:n_train], bank_labels, feats[n_train:n_train + n_val],
                                k=k, temperature=temperature)
            return scores, feats  # the features stay on device unless someone fetches them

        replicated = sharding_lib.replicated(mesh)
        return jax.jit(run, out_shardings=(replicated, batch))

    # --- per step ----------------------------------------------------------------------

    def run(self, state) -> dict:
        """Evaluates now; returns the scalars."""
        t0 = time.perf_counter()
        scores, _ = self._run(self.variables(state), self.images)
        scores = np.asarray(jax.device_get(scores), np.float64)
        labels = self.val_labels
        maps = mean_average_precision(scores, labels)
        top1 = labels[np.arange(len(labels)), np.argmax(scores, axis=1)] > 0
        return {"eval/knn_top1": float(np.mean(top1)),
                "eval/knn_map_micro": maps["map_micro"],
                "eval/knn_map_macro": maps["map_macro"],
                "eval/knn_time_s": time.perf_counter() - t0}

    def maybe_run(self, step: int, state) -> dict | None:
        """Scalars when monitoring is on and `step` is a multiple of every_steps, else None."""
        if not self.enabled or step % self.every:
            return None
        return self.run(state)
