#!/usr/bin/env bash
# The one prepared GPU check (gpu_check.py says what it runs, in which order, and which files it writes).
#
#   bash benchmarks/gpu_check.sh                              # on a CUDA machine: results in $OUT, else in a new /tmp folder
#   bash benchmarks/gpu_check.sh --rest PREVIOUS/check_rows.jsonl --budget 240   # a second call: only what the first lacks
#   bash benchmarks/gpu_check.sh --smoke                      # the same script on the CPU (tiny model, small images), ~1 min
#
# It installs nothing and needs no network: it uses the machine's python3 (or $PYTHON) and its torch, and says at
# the start which of the packages the toolkit needs are missing. The whole run is stopped after $GPU_CHECK_LIMIT_S
# seconds (default 480) whatever happens; every row measured by then is already in the output folder.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1  # the project root
python=${PYTHON:-$(command -v python3 || command -v python)}
out=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$out"
echo "gpu_check: results in $out (python: $python)"
export PYTHONUNBUFFERED=1
timeout -k 10 "${GPU_CHECK_LIMIT_S:-480}" "$python" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/check_console.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "gpu_check: stopped after ${GPU_CHECK_LIMIT_S:-480} s; the rows measured are in $out"
exit "$status"
