#!/bin/bash
# Runs softcon-jax training on several machines without a scheduler.
#
# JAX's multi-controller runtime wants one process per machine, each told the
# coordinator address (process 0's host:port), the process count and its own
# rank. This script exports them as JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
# and JAX_PROCESS_ID (plus JAX_LOCAL_DEVICE_IDS when given), which the trainer
# hands to jax.distributed.initialize().
#
# Two ways to use it:
#   * on each node:   launch/multinode.sh --coordinator node0:1234 --num-nodes 2 --node-rank R ...
#   * from one place: launch/multinode.sh --hosts node0,node1 ...   (ssh-starts every node;
#     host i gets rank i, host 0 is the coordinator unless --coordinator says otherwise)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"

COORDINATOR=${COORDINATOR_ADDRESS:-}
NUM_NODES=${NUM_NODES:-}
NODE_RANK=${NODE_RANK:-}
PORT=${COORDINATOR_PORT:-1234}
HOSTS=${MULTINODE_HOSTS:-}
LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}
REMOTE_DIR=${MULTINODE_REMOTE_DIR:-$REPO_DIR}
PYTHON=${SOFTCON_PYTHON:-.venv/bin/python}
LOG_DIR=${MULTINODE_LOG_DIR:-$REPO_DIR/runs/launch_logs}
NODE_CMD=()

usage() {
  cat <<EOF
Usage: launch/multinode.sh --coordinator HOST[:PORT] --num-nodes N --node-rank R \\
         --config configs/NAME.py --workdir DIR [options] [--config.KEY=VALUE ...]
       launch/multinode.sh --hosts HOST0,HOST1,... --config configs/NAME.py --workdir DIR [options]

Starts one training process per node. The first form runs on one node and must
be started on every node (same settings, ranks 0..N-1). The second form starts
all nodes from one machine over ssh (key-based, non-interactive) and writes one
log per node to LOG_DIR. Every process gets JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID.

Settings (flag, or the environment variable in brackets):
  --coordinator HOST[:PORT]  address of the rank-0 node, reachable from all nodes;
                             default with --hosts: the first host  [COORDINATOR_ADDRESS]
  --port PORT                port when the address has none (default: 1234)
                                                                    [COORDINATOR_PORT]
  --num-nodes N              number of nodes = processes                   [NUM_NODES]
  --node-rank R              this node's rank, 0..N-1 (rank 0 runs the coordinator)
                                                                           [NODE_RANK]
  --hosts H0,H1,...          ssh-start every host from here; N = number of hosts,
                             rank = position in the list                [MULTINODE_HOSTS]
  --local-device-ids 0,1,..  GPUs each process uses (default: all visible)
                                                                [JAX_LOCAL_DEVICE_IDS]
  --remote-dir DIR           repo dir on the hosts (default: this repo's path)
                                                                [MULTINODE_REMOTE_DIR]
  --python EXE               python, relative to the repo dir or absolute
                             (default: .venv/bin/python)              [SOFTCON_PYTHON]
  --log-dir DIR              per-node logs with --hosts (default: runs/launch_logs)
                                                                   [MULTINODE_LOG_DIR]

$(common_usage)

Example, two GPU nodes, run on each node with its rank:
  launch/multinode.sh --coordinator 10.0.0.1:1234 --num-nodes 2 --node-rank 0 \\
    --config configs/softcon.py:vits14,s2c --workdir /shared/runs/vits14
EOF
}

parse_args() {
  while (($#)); do
    if is_eq_flag "$1"; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
    SHIFT_BY=2
    case $1 in
      --coordinator) COORDINATOR=$(need_value "$@") ;;
      --port) PORT=$(need_value "$@") ;;
      --num-nodes) NUM_NODES=$(need_value "$@") ;;
      --node-rank) NODE_RANK=$(need_value "$@") ;;
      --hosts) HOSTS=$(need_value "$@") ;;
      --local-device-ids) LOCAL_DEVICE_IDS=$(need_value "$@") ;;
      --remote-dir) REMOTE_DIR=$(need_value "$@") ;;
      --python) PYTHON=$(need_value "$@") ;;
      --log-dir) LOG_DIR=$(need_value "$@") ;;
      *) parse_common_arg "$@" ;;
    esac
    shift "$SHIFT_BY"
  done
}

validate() {
  is_uint "$PORT" || die "--port must be a number: $PORT"
  if [[ -n $HOSTS ]]; then
    IFS=, read -ra HOST_LIST <<<"$HOSTS"
    [[ ${#HOST_LIST[@]} -gt 0 ]] || die "--hosts is empty"
    if [[ -n $NUM_NODES && $NUM_NODES != "${#HOST_LIST[@]}" ]]; then
      die "--num-nodes $NUM_NODES does not match the ${#HOST_LIST[@]} hosts in --hosts"
    fi
    # Each host gets its rank from its position; a NODE_RANK in the environment is ignored.
    NUM_NODES=${#HOST_LIST[@]}
    COORDINATOR=${COORDINATOR:-${HOST_LIST[0]}}
  else
    require "$COORDINATOR" "--coordinator (or env COORDINATOR_ADDRESS)"
    require "$NUM_NODES" "--num-nodes (or env NUM_NODES)"
    require "$NODE_RANK" "--node-rank (or env NODE_RANK)"
  fi
  if ! is_uint "$NUM_NODES" || ((10#$NUM_NODES == 0)); then
    die "--num-nodes must be a positive integer: $NUM_NODES"
  fi
  if [[ -z $HOSTS ]] && { ! is_uint "$NODE_RANK" || ((10#$NODE_RANK >= 10#$NUM_NODES)); }; then
    die "--node-rank must be an integer in 0..$((10#$NUM_NODES - 1)): $NODE_RANK"
  fi
  if [[ $COORDINATOR != *:* ]]; then COORDINATOR=$COORDINATOR:$PORT; fi
  is_uint "${COORDINATOR##*:}" || die "--coordinator must be HOST:PORT: $COORDINATOR"
  check_train_settings "$REPO_DIR"
}

# Fills NODE_CMD with the env + trainer command for rank $1.
node_command() {
  local env_vars=(JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NUM_NODES"
    JAX_PROCESS_ID="$1")
  if [[ -n $LOCAL_DEVICE_IDS ]]; then env_vars+=(JAX_LOCAL_DEVICE_IDS="$LOCAL_DEVICE_IDS"); fi
  build_train_cmd "$PYTHON"
  NODE_CMD=(env "${env_vars[@]}" PYTHONUNBUFFERED=1 "${TRAIN_CMD[@]}")
}

run_this_node() {
  run cd "$REPO_DIR"
  comment "node $NODE_RANK of $NUM_NODES, coordinator $COORDINATOR"
  node_command "$NODE_RANK"
  run "${NODE_CMD[@]}"
}

run_all_hosts() {
  run mkdir -p "$LOG_DIR"
  local rank pids=() remote log_file line
  for rank in "${!HOST_LIST[@]}"; do
    node_command "$rank"
    remote="cd $(quote_word "$REMOTE_DIR") && $(quote_cmd "${NODE_CMD[@]}")"
    log_file=$LOG_DIR/$RUN_ID-node$rank-${HOST_LIST[rank]}.log
    # BatchMode: fail instead of waiting for a password prompt.
    line="$(quote_cmd ssh -o BatchMode=yes "${HOST_LIST[rank]}" "$remote")"
    line+=" 2>&1 | tee -a $(quote_word "$log_file")"
    if is_dry_run; then
      run_pipe "$line"
    else
      run_pipe "$line" &
      pids+=("$!")
    fi
  done
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  comment "logs: $LOG_DIR/$RUN_ID-node*.log"
  return "$rc"
}

main() {
  parse_args "$@"
  validate
  if [[ -n $HOSTS ]]; then run_all_hosts; else run_this_node; fi
}

main "$@"
