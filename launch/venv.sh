# shellcheck shell=bash
# Sourced by launch/quickstart.sh and tests/run.sh: create or reuse .venv at the repository
# root and install the package (with optional extras). Re-installs only when setup.cfg or the
# extras change, so both commands are idempotent and fast the second time.

ensure_venv() {
  local extras="${1:-}"
  local python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: softcon-jax needs Python >= 3.11; '$python' is $("$python" --version 2>&1)." \
      "Set PYTHON=/path/to/python3.11." >&2
    return 1
  fi
  if [[ ! -x .venv/bin/python ]]; then
    echo "==> creating .venv with $("$python" --version)"
    "$python" -m venv .venv
  fi
  local stamp
  stamp=".venv/.softcon-installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)${extras:+-$extras}"
  stamp="${stamp//[\[\],]/_}"
  if [[ ! -f "$stamp" ]]; then
    echo "==> installing softcon-jax${extras:+ with extras [$extras]} into .venv (first run only)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
    touch "$stamp"
  fi
}

# JAX's CUDA plugin (the `gpu-plan` extra), installed apart into .venv/gpu-plan for the GPU
# plan tests, which put it on PYTHONPATH only where they plan for a GPU cluster: installed
# into .venv itself, the plugin prints CUDA-driver notices into every JAX process on a machine
# without a GPU. Exports SOFTCON_GPU_PLAN_SITE.
ensure_gpu_plan_site() {
  local site=".venv/gpu-plan" jax_version
  jax_version="$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
  if [[ ! -f "$site/.installed-jax-$jax_version" ]]; then
    echo "==> installing JAX's CUDA plugin $jax_version into $site (GPU plan tests; first run only)"
    rm -rf "$site"
    .venv/bin/python -m pip install --quiet --no-deps --target "$site" \
      "jax-cuda12-plugin==$jax_version" "jax-cuda12-pjrt==$jax_version" \
      nvidia-cuda-nvcc-cu12 nvidia-cudnn-cu12 nvidia-cublas-cu12
    touch "$site/.installed-jax-$jax_version"
  fi
  export SOFTCON_GPU_PLAN_SITE="$PWD/$site"
}
