#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one go, for a lent NVIDIA machine (one H100/H200,
# under 8 minutes):
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        # default: gpu_suite_out/
#
# 1. train step, JAX vs PyTorch, every SoftCon and SeCo case (bf16, batch 64 per view),
#    with MFU from compiled FLOPs against the device's peak     -> compare.{md,json}
# 2. the ViTs with cuDNN flash attention, pipelined steps (MFU) -> cudnn_attention.{md,json}
# 3. host dispatch cost against the number of state leaves       -> dispatch.md
# 4. the trainer's own loop with and without device prefetch     -> train_loop.md
# Each stage has its own time limit, so one slow stage cannot eat the others' time; a stage
# that fails or times out is reported in summary.txt and the rest still run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

OUT="${1:-gpu_suite_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"
} >"$SUMMARY" 2>&1

stage() {  # stage NAME SECONDS COMMAND...: stdout to OUT/NAME.md, status to the summary
  local name="$1" limit="$2" start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.md" 2>"$OUT/$name.log"
  rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$SUMMARY"
}

stage compare 270 "$PY" benchmarks/compare.py --num-devices 1 --per-device-batch 64 \
  --steps 20 --warmup 3 --json "$OUT/compare.json"
stage cudnn_attention 90 "$PY" benchmarks/train_step.py --num-devices 1 \
  --per-device-batch 64 --pipelined --cases softcon_vitb14,softcon_vits14 \
  --attention cudnn --json "$OUT/cudnn_attention.json"
stage dispatch 30 "$PY" benchmarks/dispatch.py
stage train_loop 70 "$PY" benchmarks/train_loop.py

echo "Tables in $OUT/*.md; paste them into BENCHMARKS.md (GPU sections) with the summary."
