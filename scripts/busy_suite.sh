#!/usr/bin/env bash
# Run the test suite (`make test`) while a CPU hog keeps one core busy, as CI's machine may be:
# proves the suite does not depend on a quiet machine. Usage: scripts/busy_suite.sh [RUNS] [HOGS]
# (defaults 3 runs, 1 hog). Each run's result, wall time and load average go to stdout; the
# script exits non-zero as soon as a run fails. Each run's log is kept in busy-suite-N.log.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
hogs=${2:-1}
hog_pids=()
stop_hogs() { for p in "${hog_pids[@]}"; do kill "$p" 2>/dev/null; done; hog_pids=(); }
trap stop_hogs EXIT
for i in $(seq 1 "$hogs"); do
  ( exec nice -n 0 sh -c 'while :; do :; done' ) &
  hog_pids+=($!)
done
echo "busy suite: $runs run(s) of make test beside $hogs CPU hog(s) on $(nproc) cores"
for run in $(seq 1 "$runs"); do
  log="busy-suite-$run.log"
  start=$(date +%s)
  make test >"$log" 2>&1
  rc=$?
  end=$(date +%s)
  summary=$(grep -E "^[0-9]+ (passed|failed)|[0-9]+ errors? in|Segmentation|Error [0-9]+" "$log" | paste -sd ';' -)
  echo "run $run: rc=$rc wall=$((end - start)) s load=$(cut -d' ' -f1-3 /proc/loadavg) :: $summary"
  if [ "$rc" -ne 0 ]; then
    echo "run $run failed; see $log"
    exit "$rc"
  fi
done
echo "busy suite: $runs/$runs runs passed"
