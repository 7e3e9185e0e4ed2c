#!/bin/bash
# Runs softcon-jax training on a Cloud TPU VM or pod slice.
#
# Steps: create or reuse the TPU (directly or through a queued resource), ship
# the code to every worker (tarball of the git working tree, or git clone/pull),
# install it into a venv on every worker, start the same training command on all
# workers at once and stream the output into a per-run log, optionally delete
# the TPU afterwards. JAX detects the TPU pod itself, so no coordinator
# variables are set: jax.distributed.initialize() needs no arguments there.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"

TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
TPU_PROJECT=${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
TPU_ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
TPU_RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
TPU_QUEUED=${TPU_QUEUED:-0}
TPU_SPOT=${TPU_SPOT:-0}
TPU_REPO_URL=${TPU_REPO_URL:-}
TPU_REF=${TPU_REF:-main}
TPU_REMOTE_DIR=${TPU_REMOTE_DIR:-softcon-jax}
TPU_PYTHON=${TPU_PYTHON:-python3.11}
TPU_PIP_PACKAGES=${TPU_PIP_PACKAGES:-jax[tpu] gcsfs google-cloud-storage}
TPU_SKIP_INSTALL=${TPU_SKIP_INSTALL:-0}
TPU_LOG_DIR=${TPU_LOG_DIR:-$REPO_DIR/runs/launch_logs}
TPU_DELETE_AFTER=${TPU_DELETE_AFTER:-0}

usage() {
  cat <<EOF
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --project PROJECT --accelerator-type TYPE \\
         --config configs/NAME.py --workdir gs://BUCKET/run [options] [--config.KEY=VALUE ...]

Creates (or reuses) a Cloud TPU VM / pod slice, ships and installs the code on
every worker, and starts the trainer on all workers with
'gcloud compute tpus tpu-vm ssh NAME --worker=all'. Output is streamed and
saved to LOG_DIR/NAME-RUNID.log.

Settings (flag, or the environment variable in brackets):
  --name NAME              TPU VM (and queued resource) name; required      [TPU_NAME]
  --zone ZONE              e.g. us-central2-b; required    [TPU_ZONE, CLOUDSDK_COMPUTE_ZONE]
  --project PROJECT        GCP project; required         [TPU_PROJECT, CLOUDSDK_CORE_PROJECT]
  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v6e-16; required  [TPU_ACCELERATOR_TYPE]
  --runtime-version VER    TPU software version; default from the type:  [TPU_RUNTIME_VERSION]
                           v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --queued                 create through a queued resource, wait until ACTIVE [TPU_QUEUED=1]
  --spot                   request Spot capacity                              [TPU_SPOT=1]
  --delete-after           delete the TPU / queued resource when the script exits,
                           also after a failure                       [TPU_DELETE_AFTER=1]
  --repo-url URL           git clone/pull this URL on each worker, instead of copying the
                           local working tree (git ls-files: tracked + untracked, not
                           ignored)                                        [TPU_REPO_URL]
  --ref REF                branch, tag or commit for --repo-url (default: main)   [TPU_REF]
  --remote-dir DIR         code dir on the workers, relative to the home dir
                           (default: softcon-jax)                        [TPU_REMOTE_DIR]
  --python EXE             python for the venv (default: python3.11, apt-get installed
                           when missing)                                     [TPU_PYTHON]
  --pip-packages "PKGS"    installed with 'pip install -e .' (default: "jax[tpu] gcsfs
                           google-cloud-storage"; the last two serve gs:// paths)
                                                                       [TPU_PIP_PACKAGES]
  --skip-install           skip the install step (code already installed) [TPU_SKIP_INSTALL=1]
  --log-dir DIR            run log directory (default: runs/launch_logs); with a gs://
                           directory the log is written locally and copied there at the
                           end                                              [TPU_LOG_DIR]

$(common_usage)

Example (TPU v4-32 = 4 hosts):
  launch/tpu_pod.sh --name softcon-v4 --zone us-central2-b --project my-proj \\
    --accelerator-type v4-32 --config configs/softcon.py:vits14,s2c \\
    --workdir gs://my-bucket/runs/vits14 --data gs://my-bucket/ssl4eo_s12 \\
    --log-dir gs://my-bucket/logs --delete-after --config.total_steps=100000
EOF
}

parse_args() {
  while (($#)); do
    if is_eq_flag "$1"; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
    SHIFT_BY=2
    case $1 in
      --name) TPU_NAME=$(need_value "$@") ;;
      --zone) TPU_ZONE=$(need_value "$@") ;;
      --project) TPU_PROJECT=$(need_value "$@") ;;
      --accelerator-type) TPU_ACCELERATOR_TYPE=$(need_value "$@") ;;
      --runtime-version) TPU_RUNTIME_VERSION=$(need_value "$@") ;;
      --queued) TPU_QUEUED=1; SHIFT_BY=1 ;;
      --spot) TPU_SPOT=1; SHIFT_BY=1 ;;
      --delete-after) TPU_DELETE_AFTER=1; SHIFT_BY=1 ;;
      --repo-url) TPU_REPO_URL=$(need_value "$@") ;;
      --ref) TPU_REF=$(need_value "$@") ;;
      --remote-dir) TPU_REMOTE_DIR=$(need_value "$@") ;;
      --python) TPU_PYTHON=$(need_value "$@") ;;
      --pip-packages) TPU_PIP_PACKAGES=$(need_value "$@") ;;
      --skip-install) TPU_SKIP_INSTALL=1; SHIFT_BY=1 ;;
      --log-dir) TPU_LOG_DIR=$(need_value "$@") ;;
      *) parse_common_arg "$@" ;;
    esac
    shift "$SHIFT_BY"
  done
}

default_runtime_version() {
  case $TPU_ACCELERATOR_TYPE in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

validate() {
  require "$TPU_NAME" "--name (or env TPU_NAME)"
  require "$TPU_ZONE" "--zone (or env TPU_ZONE)"
  require "$TPU_PROJECT" "--project (or env TPU_PROJECT)"
  require "$TPU_ACCELERATOR_TYPE" "--accelerator-type (or env TPU_ACCELERATOR_TYPE)"
  # A pulled repo is checked out remotely, so the config can only be checked when copying.
  if [[ -n $TPU_REPO_URL ]]; then check_train_settings ""; else check_train_settings "$REPO_DIR"; fi
  if [[ -z $TPU_REPO_URL && $CONFIG == /* ]]; then
    die "--config must be a path inside the repo when the working tree is copied: $CONFIG"
  fi
  [[ $TPU_REMOTE_DIR != /* && $TPU_REMOTE_DIR != *' '* ]] \
    || die "--remote-dir must be a relative path without spaces: $TPU_REMOTE_DIR"
  if [[ $WORKDIR != gs://* ]]; then
    # Every worker is a separate VM: multi-host checkpoints need one shared directory.
    warn "--workdir $WORKDIR is not on GCS; on a multi-host slice each worker gets its own copy"
  fi
  TPU_RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-$(default_runtime_version)}
  LOCATION=(--zone "$TPU_ZONE" --project "$TPU_PROJECT")
  SSH_ALL=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all)
}

# True when the describe command "$@" succeeds. A dry run prints it and
# assumes the resource is missing, so the create command is shown too.
resource_exists() {
  if is_dry_run; then
    run "$@"
    comment "the next command runs only if the describe above fails"
    return 1
  fi
  log "+ $(quote_cmd "$@")"
  "$@" >/dev/null 2>&1
}

wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
    --format='value(state.state)')
  if is_dry_run; then
    run "${describe[@]}"
    comment "repeated every 60 s until the state is ACTIVE"
    return 0
  fi
  local state
  while true; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state" ;;
      *) log "queued resource $TPU_NAME is ${state:-unknown}; checking again in 60 s" ;;
    esac
    sleep 60
  done
}

# Fails when a reused TPU has another accelerator type than requested.
check_accelerator_type() {
  is_dry_run && return 0
  local actual
  actual=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" \
    --format='value(acceleratorType)')
  [[ $actual == "$TPU_ACCELERATOR_TYPE" ]] || die "TPU $TPU_NAME exists with accelerator" \
    "type $actual, not $TPU_ACCELERATOR_TYPE (--accelerator-type)"
}

ensure_tpu() {
  local capacity=() tpus=(gcloud compute tpus)
  if ((TPU_SPOT)); then capacity=(--spot); fi
  if ((TPU_QUEUED)); then
    if resource_exists "${tpus[@]}" queued-resources describe "$TPU_NAME" "${LOCATION[@]}"; then
      log "reusing queued resource $TPU_NAME"
    else
      run "${tpus[@]}" queued-resources create "$TPU_NAME" "${LOCATION[@]}" \
        --node-id "$TPU_NAME" --accelerator-type "$TPU_ACCELERATOR_TYPE" \
        --runtime-version "$TPU_RUNTIME_VERSION" "${capacity[@]}"
    fi
    wait_until_active
  else
    if resource_exists "${tpus[@]}" tpu-vm describe "$TPU_NAME" "${LOCATION[@]}"; then
      log "reusing TPU VM $TPU_NAME"
    else
      run "${tpus[@]}" tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
        --accelerator-type "$TPU_ACCELERATOR_TYPE" --version "$TPU_RUNTIME_VERSION" \
        "${capacity[@]}"
    fi
  fi
  check_accelerator_type
}

delete_tpu() {
  if ((TPU_QUEUED)); then
    # --force also deletes the TPU VM the queued resource created.
    run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
  fi
}

ship_code() {
  local dir
  dir=$(quote_word "$TPU_REMOTE_DIR")
  if [[ -n $TPU_REPO_URL ]]; then
    local url ref
    url=$(quote_word "$TPU_REPO_URL")
    ref=$(quote_word "$TPU_REF")
    run "${SSH_ALL[@]}" --command "{ [ -d $dir/.git ] || git clone --quiet $url $dir; } \
&& git -C $dir fetch --quiet origin $ref && git -C $dir checkout --quiet --force FETCH_HEAD"
  else
    local tarball=${TMPDIR:-/tmp}/softcon-jax-$TPU_NAME-$RUN_ID.tgz
    local repo
    repo=$(quote_word "$REPO_DIR")
    run_pipe "git -C $repo ls-files -z --cached --others --exclude-standard \
| tar -C $repo --null -T - -czf $(quote_word "$tarball")"
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:softcon-jax-code.tgz" \
      "${LOCATION[@]}" --worker=all
    run rm -f "$tarball"
    run "${SSH_ALL[@]}" --command "mkdir -p $dir && tar -xzf softcon-jax-code.tgz -C $dir"
  fi
}

install_code() {
  if ((TPU_SKIP_INSTALL)); then comment "install skipped (--skip-install)"; return 0; fi
  local py pkgs=()
  py=$(quote_word "$TPU_PYTHON")
  read -ra pkgs <<<"$TPU_PIP_PACKAGES"
  run "${SSH_ALL[@]}" --command "{ command -v $py >/dev/null \
|| { sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv; }; } \
&& cd $(quote_word "$TPU_REMOTE_DIR") && { [ -x .venv/bin/python ] || $py -m venv .venv; } \
&& .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . $(quote_cmd "${pkgs[@]}")"
}

start_training() {
  local log_dir=$TPU_LOG_DIR
  if [[ $log_dir == gs://* ]]; then log_dir=$REPO_DIR/runs/launch_logs; fi
  local log_file=$log_dir/$TPU_NAME-$RUN_ID.log
  build_train_cmd .venv/bin/python
  local remote ssh_line rc=0
  remote="cd $(quote_word "$TPU_REMOTE_DIR") && env PYTHONUNBUFFERED=1"
  remote+=" $(quote_cmd "${TRAIN_CMD[@]}")"
  ssh_line="$(quote_cmd "${SSH_ALL[@]}" --command "$remote")"
  run mkdir -p "$log_dir"
  run_pipe "$ssh_line 2>&1 | tee -a $(quote_word "$log_file")" || rc=$?
  if [[ $TPU_LOG_DIR == gs://* ]]; then
    run gcloud storage cp "$log_file" "${TPU_LOG_DIR%/}/" || warn "could not upload $log_file"
  fi
  comment "log: $log_file"
  return "$rc"
}

main() {
  parse_args "$@"
  validate
  ensure_tpu
  if ((TPU_DELETE_AFTER)); then trap delete_tpu EXIT; fi
  ship_code
  install_code
  start_training
}

main "$@"
