# Shared by scripts/experiment.sh and scripts/step_size_sweep.sh (sourced, from the repository root):
# one run of a script per output folder, and timed stages.

# take_lock FOLDER WHAT: hold FOLDER/.running for this shell's lifetime, or exit 1 when another WHAT holds it.
take_lock() {
  exec 9>"$1/.running"
  if ! flock -n 9; then
    echo "another $2 is running in $1 (lock $1/.running); wait for it or kill it first" >&2
    exit 1
  fi
}

# stage NAME COMMAND...: run COMMAND and append its wall time (seconds) to $out/timings.tsv
stage() {
  local name=$1 started
  shift
  started=$(date +%s)
  echo "=== $(date -Is) $name: $*"
  "$@"
  printf '%s\t%s\t%s\n' "$name" "$(($(date +%s) - started))" "$(date -Is)" >>"$out/timings.tsv"
}
