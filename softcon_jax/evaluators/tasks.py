"""Evaluation tasks by name (`--task`): kNN and linear probes on downstream datasets.

A task is `fn(backbone, options) -> result dict`; add one with `@register_task("name")`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np

from softcon_jax.evaluators.backbone import ZERO_FILL_BANDS, Backbone
from softcon_jax.evaluators.knn import knn_scores_chunked
from softcon_jax.evaluators.linear_probe import train_linear_probe
from softcon_jax.evaluators.metrics import mean_average_precision, top1_accuracy
from softcon_jax.evaluators.tfds_datasets import (DATASETS, EvalOptions, FeatureExtractor,
                                                  Split, extract_split)
from softcon_jax.registry import Registry
from softcon_jax.cli import UserValueError

# `fn(backbone, options) -> result dict` by `--task` name.
TASKS: Registry[Callable[[Backbone, EvalOptions], dict]] = Registry("evaluation task", "--task")
DEFAULT_TRAIN_FRACTION = {"bigearthnet_linear": 0.1, "bigearthnet_knn": 0.1}


def register_task(name: str):
    """Decorator adding `fn(backbone, options) -> result dict` to `TASKS`."""
    return TASKS.register(name)


def _train_test(dataset: str, task: str, backbone: Backbone,
                opts: EvalOptions) -> tuple[Split, Split, dict]:
    spec = DATASETS[dataset]
    fraction = opts.train_fraction
    if fraction is None:
        fraction = DEFAULT_TRAIN_FRACTION.get(task, 1.0)
    if not 0.0 < fraction <= 1.0:
        raise UserValueError(f"--train-fraction={fraction}: expected a value in (0, 1].")
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
    return TASKS.names()


def evaluate(backbone: Backbone, task: str, opts: EvalOptions) -> dict:
    """Runs `task` on `backbone`; returns the result record (metrics + provenance)."""
    run = TASKS.get(task)
    t0 = time.perf_counter()
    result = run(backbone, opts)
    return {"task": task, "step": backbone.step, "source": backbone.source, **result,
            "input": {"band_order": backbone.band_order, "img_size": backbone.img_size,
                      "normalization": backbone.normalization,
                      "input_scale": backbone.input_scale,
                      "zero_filled_after_normalisation": [
                          b for b in backbone.band_order if b in ZERO_FILL_BANDS]},
            "seed": opts.seed, "time_s": round(time.perf_counter() - t0, 2)}
