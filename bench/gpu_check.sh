#!/usr/bin/env bash
# One GPU check in under 8 minutes, installing nothing: versions, the native build, the tests
# marked gpu, the LSTM and all-reduce benchmarks and compute-sanitizer over every kernel, each
# stage with its own time budget, every row written to the results folder as it finishes, and a
# summary table printed last. `--dry-run` runs the same stages on a machine without a GPU (tiny
# shapes, Triton's interpreter, CPU processes), as `make test` does.
#
#   bash bench/gpu_check.sh [--out results] [--bundle results.tar.gz] [--dry-run] [--python python3]
#                           [--only STAGE ...]
#
# Exit status: 0 all checks passed, 1 a correctness check failed (or, dry run, a stage wrote no
# rows), 3 nothing failed but a stage ran out of time. The stages live in bench/gpu_check.py.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"  # no cd: a relative --out is the caller's folder
python=python3
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python) python="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
# A signal to this script (a wrapper's time limit) reaches the stages, which then print the
# summary of what they finished.
"$python" "$here/gpu_check.py" --python "$python" ${args[@]+"${args[@]}"} &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"
status=$?
if [ "$status" -gt 128 ]; then  # wait was interrupted by the signal: wait for the summary
    wait "$pid"
    status=$?
fi
trap - TERM INT
if [ "$status" -ne 0 ] && [ "$status" -ne 1 ] && [ "$status" -ne 3 ]; then
    # The orchestrator itself failed: show whatever rows the stages left.
    echo "bench/gpu_check.py exited $status; rows written so far:" >&2
    out="$(printf '%s\n' ${args[@]+"${args[@]}"} | sed -n '/^--out$/{n;p}')"
    "$python" "$here/gpu_summary.py" "${out:-results}" 2>&1 || cat "${out:-results}"/*.csv
fi
exit "$status"
