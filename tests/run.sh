#!/usr/bin/env bash
# The whole test suite: create or reuse .venv, install the package with its test extra
# (pytest, torch/torchvision/timm for the parity tests, shellcheck) and, apart, JAX's CUDA
# plugin for the GPU plan tests; run pytest.
#
#   bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/venv.sh
source launch/venv.sh
ensure_venv "test"
ensure_gpu_plan_site
exec .venv/bin/python -m pytest "$@"
