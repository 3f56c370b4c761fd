# shellcheck shell=bash
# Shared by the launch scripts: usage text from the script's header, and run-or-print.

# Print the comment block at the top of "$1" (after the shebang and #SBATCH lines), without the '# '.
usage() {
  sed -n '2,/^[^#]/p' "$1" | grep -v '^#SBATCH' | grep '^#' | sed 's/^# \{0,1\}//'
}

# With DRY_RUN=1, print the command (shell-quoted) instead of running it.
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    exec "$@"
  fi
}

# Check what the launch of "$1" processes would refuse (mtllm preflight: config, backend and batch geometry for that
# world size, run folder, shards, task files, W&B), one line per problem; exit 2 before anything is spawned.
# Also with --dry-run (run that before sbatch: nothing is queued). "${@:2}": overrides the script itself adds.
preflight() {
  "${PYTHON:-python}" -m mtllm_train preflight --world-size "$1" --config "$CONFIG" "$COMMAND" "${@:2}" \
    "${OVERRIDES[@]}" || exit 2
}

# The number of GPUs on this node (1 when there are none, e.g. for a CPU dry run).
local_gpus() {
  local count
  count=$(nvidia-smi -L 2>/dev/null | wc -l)
  echo $((count > 0 ? count : 1))
}

# Parse `[--dry-run] [COMMAND] CONFIG [key.sub=value ...]` for script "$1": sets DRY_RUN, COMMAND (train,
# task-train or task-distill; default train), CONFIG and OVERRIDES (an array); prints the usage and exits 2
# when CONFIG is missing or -h/--help is given.
parse_config_args() {
  local script=$1
  shift
  if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
  fi
  # shellcheck disable=SC2034  # read by the script that sources this file
  COMMAND=train
  if [[ ${1:-} == train || ${1:-} == task-train || ${1:-} == task-distill ]]; then
    # shellcheck disable=SC2034
    COMMAND=$1
    shift
  fi
  if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    usage "$script"
    exit 2
  fi
  # shellcheck disable=SC2034  # read by the script that sources this file
  CONFIG=$1
  shift
  # shellcheck disable=SC2034
  OVERRIDES=("$@")
}
