#!/usr/bin/env bash
# The test suite as `make test` runs it: two pytest lanes side by side, which on the 2-core CI
# machine take about half the time of one pytest.
# - The in-process lane: the single-process tests of kernels, modules and their compilation
#   (Triton's interpreter, torch.compile, nvcc), at the lowest CPU priority (nice 19).
# - The main lane: every other test, then the benchmark suites once each at tiny shapes. Its
#   ranks wait on each other, on timeouts and on subprocesses for about half their time; the
#   in-process lane takes only the CPU they leave idle, so it never slows a rank that a timing
#   test watches.
# The in-process lane's output follows the main lane's (its log: results/tests-in-process.log).
# Exit status: 0 when both lanes pass, else the main lane's failing pytest status, else the
# in-process lane's.
#
#   bash tests/run_suite.sh PYTHON                  # both lanes
#   bash tests/run_suite.sh PYTHON PYTEST_ARGS...   # pytest with these arguments, then the
#                                                   # benchmark suites; no second lane
set -uo pipefail
cd "$(dirname "$0")/.."
python="$1"
shift

bench_suites() {
    "$python" -m pytest bench --benchmark-disable -q -p no:cacheprovider
}

if [ $# -gt 0 ]; then
    "$python" -m pytest "$@" && bench_suites
    exit
fi

in_process=(tests/nn tests/ops tests/native/test_cuda_compile.py)
# Each lane lists its slowest tests: where the suite's time goes, run after run.
durations=(--durations=15 --durations-min=5)
log_file=results/tests-in-process.log
mkdir -p results
# A session of its own, so that an interrupted run stops the lane and what it started (nvcc).
setsid --wait nice -n 19 "$python" -m pytest -p no:cacheprovider "${durations[@]}" \
    "${in_process[@]}" >"$log_file" 2>&1 &
lane=$!
trap 'kill -TERM -- "-$lane" "$lane" 2>/dev/null; exit 130' INT TERM

"$python" -m pytest "${durations[@]}" "${in_process[@]/#/--ignore=}" && bench_suites
main_status=$?

wait "$lane"
lane_status=$?
trap - INT TERM
echo
echo "===== in-process lane: ${in_process[*]} (beside the above, at nice 19) ====="
cat "$log_file"
if [ "$main_status" -ne 0 ]; then
    exit "$main_status"
fi
exit "$lane_status"
