#!/usr/bin/env bash
# The one prepared GPU check (gpu_check.py says what it runs, in which order, and which files it writes).
#
#   bash benchmarks/gpu_check.sh                          # on a CUDA machine: 420 s of checks, stopped at 450 s
#   bash benchmarks/gpu_check.sh --rest DIR_OR_ROWS_FILE --budget 200   # a second call: only what the first left
#   bash benchmarks/gpu_check.sh --smoke                  # the same script on the CPU (tiny model, small images)
#
# Results go to $OUT when it is set, else to a new /tmp folder. It installs nothing and needs no network: it uses
# $PYTHON, else the machine's python3, and its torch, and says at the start which of the packages the toolkit needs
# are missing. The whole run is stopped 30 s after its --budget (default 420 s; $GPU_CHECK_LIMIT_S sets the limit
# outright) whatever happens; every row measured by then is already in the output folder.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1  # the project root
python=${PYTHON:-$(command -v python3 || command -v python)}
out=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
budget=420
previous=""
for arg in "$@"; do
  [ "$previous" = "--budget" ] && budget=$arg
  case $arg in --budget=*) budget=${arg#--budget=} ;; esac
  previous=$arg
done
[[ $budget =~ ^[0-9]+([.][0-9]*)?$ ]] || budget=420  # gpu_check.py says what is wrong with it
limit=${GPU_CHECK_LIMIT_S:-$(( ${budget%.*} + 30 ))}
mkdir -p "$out"
echo "gpu_check: results in $out (python: $python; stopped after $limit s at the latest)"
export PYTHONUNBUFFERED=1
timeout -k 10 "$limit" "$python" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/check_console.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "gpu_check: stopped after $limit s; the rows measured are in $out"
exit "$status"
