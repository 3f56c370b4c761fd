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

# The number of GPUs on this node (1 when there are none, e.g. for a CPU dry run).
local_gpus() {
  local count
  count=$(nvidia-smi -L 2>/dev/null | wc -l)
  echo $((count > 0 ? count : 1))
}
