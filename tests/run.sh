#!/usr/bin/env bash
# The whole test suite: create or reuse .venv, install the package with its test extra
# (pytest, torch/torchvision/timm for the parity tests, shellcheck), run pytest.
#
#   bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/venv.sh
source launch/venv.sh
ensure_venv "test"
exec .venv/bin/python -m pytest "$@"
