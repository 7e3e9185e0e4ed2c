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
import json
import logging
import os

import numpy as np

from softcon_jax import cli
from softcon_jax.data import normalize
from softcon_jax.evaluators.tasks import available_tasks, evaluate
from softcon_jax.evaluators.tfds_datasets import EvalOptions
from softcon_jax.logs import MetricWriter
from softcon_jax.pretrained import load_from_weights, load_from_workdir

def write_tensorboard(logdir: str, task: str, step: int, metrics: dict) -> None:
    """Scalars `eval/<task>/<metric>` at `step`; counts and NaNs stay in the JSON only."""
    writer = MetricWriter(logdir, subdir="")
    try:
        writer.write_scalars(step, {f"eval/{task}/{name}": value
                                    for name, value in metrics.items()
                                    if isinstance(value, float) and np.isfinite(value)})
    finally:
        writer.close()


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
    cli.run(main)
