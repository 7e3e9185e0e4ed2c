# shellcheck shell=bash
# Globals defined here are read by the scripts that source this file:
# shellcheck disable=SC2034
# Helpers shared by the launch scripts (tpu_pod.sh, gpu_slurm.sbatch, multinode.sh).
# This file is sourced, not executed.
#
# Conventions:
#   * Every command a script runs goes through `run` (one command) or `run_pipe`
#     (a shell pipeline). With --dry-run it is printed instead of run, one per
#     line, as "+ <command>" with POSIX shell quoting (shlex.split parses it).
#     A line may carry a label: "+ [task 3 on gpu02] <command>". Lines starting
#     with "#" are comments. Without --dry-run the same line is logged to stderr.
#   * Errors print "ERROR: <script>: <message>" to stderr and exit with status 2.
#   * Options shared by all scripts (--config, --workdir, --data, --config.*,
#     --dry-run, --help, --) are parsed by parse_common_arg.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  # Empty arrays under `set -u` need bash 4.4; macOS ships 3.2.
  echo "ERROR: bash >= 4.4 is required (found $BASH_VERSION); on macOS: brew install bash" >&2
  exit 2
fi

LAUNCH_NAME=$(basename "$0")
DRY_RUN=${SOFTCON_DRY_RUN:-0}
CONFIG=${SOFTCON_CONFIG:-}
WORKDIR=${SOFTCON_WORKDIR:-}
DATA=${SOFTCON_DATA:-}
TRAIN_OVERRIDES=()
TRAIN_CMD=()
CMD_LABEL=""   # when set, dry-run lines read "+ [CMD_LABEL] <command>"
SHIFT_BY=1

die() { echo "ERROR: $LAUNCH_NAME: $*" >&2; exit 2; }
warn() { echo "WARNING: $LAUNCH_NAME: $*" >&2; }
log() { echo "[$LAUNCH_NAME] $*" >&2; }
is_dry_run() { [[ $DRY_RUN == 1 ]]; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# Prints one word quoted for the shell: as is when safe, else in single quotes.
quote_word() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    local q="'\\''"
    printf "'%s'" "${1//\'/$q}"
  fi
}

# Prints its arguments as one shell-quoted command line.
quote_cmd() {
  local out="" word
  for word in "$@"; do out+="$(quote_word "$word") "; done
  printf '%s' "${out% }"
}

# Prints a dry-run line for an already quoted command line.
print_cmd() {
  echo "+ ${CMD_LABEL:+[$CMD_LABEL] }$1"
}

# Prints a dry-run comment (ignored by parsers).
comment() {
  if is_dry_run; then echo "# $*"; else log "$*"; fi
}

# Runs one command, or prints it under --dry-run.
run() {
  local line
  line=$(quote_cmd "$@")
  if is_dry_run; then print_cmd "$line"; return 0; fi
  log "+ $line"
  "$@"
}

# Runs a shell pipeline given as one already-quoted string, or prints it.
run_pipe() {
  if is_dry_run; then print_cmd "$1"; return 0; fi
  log "+ $1"
  bash -o pipefail -c "$1"
}

# require VALUE SETTING: fails naming SETTING when VALUE is empty.
require() {
  [[ -n $1 ]] || die "missing required setting: $2"
}

# Prints the value of option $1 (given as "$@"), failing if there is none.
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "option $1 needs a value"
  printf '%s' "$2"
}

# Parses one option shared by all scripts from "$@"; sets SHIFT_BY to the
# number of words it consumed. Unknown options fail.
parse_common_arg() {
  SHIFT_BY=2
  case $1 in
    --config) CONFIG=$(need_value "$@") ;;
    --workdir) WORKDIR=$(need_value "$@") ;;
    --data) DATA=$(need_value "$@") ;;
    --config.*) TRAIN_OVERRIDES+=("$1"); SHIFT_BY=1 ;;
    --dry-run) DRY_RUN=1; SHIFT_BY=1 ;;
    -h | --help) usage; exit 0 ;;
    --) TRAIN_OVERRIDES+=("${@:2}"); SHIFT_BY=$# ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
}

# True for "--flag=value" words that parse loops split into "--flag value"
# (--config.* overrides are passed on whole).
is_eq_flag() { [[ $1 == --*=* && $1 != --config.* ]]; }

# Help text for the shared options, appended to each script's usage().
common_usage() {
  cat <<'EOF'
Training settings (same for every launch script):
  --config PATH        config file (config_flags "file.py:arg" form allowed), relative
                       to the repo root; required                     [SOFTCON_CONFIG]
  --workdir DIR        checkpoints and TensorBoard; may be gs://...; required
                                                                     [SOFTCON_WORKDIR]
  --data DIR           data shard dir, may be gs://...; passed as --config.data.path=DIR
                                                                        [SOFTCON_DATA]
  --config.KEY=VALUE   config override, passed to every process (repeatable)
  -- ARGS...           everything after -- goes to the trainer unchanged
  --dry-run            print the commands as "+ ..." lines instead of running them
                                                                   [SOFTCON_DRY_RUN=1]
  -h, --help           show this help
Flags also accept the --flag=value form.
EOF
}

# Checks the training settings shared by all scripts. $1: repo dir in which
# the config path is checked (skipped when empty, e.g. code pulled remotely).
check_train_settings() {
  require "$CONFIG" "--config (or env SOFTCON_CONFIG)"
  require "$WORKDIR" "--workdir (or env SOFTCON_WORKDIR)"
  local config_file=${CONFIG%%:*}   # config_flags allows "file.py:arg"
  if [[ -n ${1:-} && $config_file != /* ]]; then config_file=$1/$config_file; fi
  if [[ -n ${1:-} && ! -f $config_file ]]; then
    # In a dry run the plan is still printed; a real run stops here.
    if is_dry_run; then warn "config file not found: $config_file (--config)"
    else die "config file not found: $config_file (--config)"; fi
  fi
}

# Fills TRAIN_CMD with the trainer command line. $1: python executable.
build_train_cmd() {
  TRAIN_CMD=("$1" -m softcon_jax.train --config "$CONFIG" --workdir "$WORKDIR")
  if [[ -n $DATA ]]; then TRAIN_CMD+=("--config.data.path=$DATA"); fi
  TRAIN_CMD+=("${TRAIN_OVERRIDES[@]}")
}

# A run id for log file names; SOFTCON_RUN_ID makes it reproducible.
RUN_ID=${SOFTCON_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
