#!/usr/bin/env bash
# The main job: a short SoftCon pretraining on a built-in synthetic SSL4EO-S12-like dataset,
# ending with the backbone exported for PyTorch (timm layout, .safetensors).
#
#   bash launch/quickstart.sh [--config.total_steps=100 ...]   # extra flags go to the trainer
#
# Idempotent: a second run resumes from (or reuses) the checkpoints in runs/quickstart/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/venv.sh
source launch/venv.sh
ensure_venv ""

WORKDIR="${WORKDIR:-runs/quickstart}"
# Without an accelerator JAX sees one CPU; simulate 8 devices so the sharded path runs.
# The flag only affects the CPU platform, so it is harmless on GPU/TPU hosts.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"

mkdir -p "$WORKDIR"
# The trainer logs to stderr; keep a copy to repeat its online-kNN verdict at the end.
.venv/bin/python -m softcon_jax.train --config configs/quickstart.py --workdir "$WORKDIR" \
  --config.data.path="$WORKDIR/data" --config.eval.data_path="$WORKDIR/eval_data" "$@" \
  2> >(tee "$WORKDIR/train.log" >&2)
.venv/bin/python -m softcon_jax.export --workdir "$WORKDIR" \
  --out "$WORKDIR/export/backbone.safetensors" --format timm

cat <<MSG

Done. Outputs in $WORKDIR/:
  data/          synthetic ArrayRecord shards + metadata.json (eval_data/: held-out kNN split)
  checkpoints/   Orbax checkpoints (train state, data iterator, config)
  tensorboard/   TensorBoard event files   (tensorboard --logdir $WORKDIR/tensorboard)
  export/        backbone.safetensors + backbone.safetensors.json (timm layout)
  train.log      the trainer's console output
Load it in PyTorch:  see docs/interop.md, "Using the export in PyTorch".
MSG
# Last line: did pretraining improve the representation (online kNN, first vs last)?
grep -o "Online kNN mAP (macro) .*" "$WORKDIR/train.log" | tail -n 1 || true
