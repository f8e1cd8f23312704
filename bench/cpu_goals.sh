#!/usr/bin/env bash
# The CPU benchmarks behind the open goals, at each goal's own settings, one after another, each
# bounded by a share of the time given. Meant for a host quieter than the 2-core development
# machine (whose steps vary by about 10 %), such as the CPUs of a lent GPU machine after
# bench/gpu_check.sh: every figure is then a CPU figure of that host, and says so (device column).
#
#   bash bench/cpu_goals.sh [--out results/cpu-goals] [--seconds 240] [--python python3]
#
# Each benchmark writes its output to <out>/<name>.log (its table last) and its rows to
# <out>/<name>.csv:
#   allreduce      fastpar's shared-memory all-reduce, 2 ranks, 64 KiB (goal <= 10 us)
#   data_parallel  exposed communication of DataParallel over the ring against DDP (goal <= 2 %)
#   pipeline       every schedule's bubble against its ideal replay (goal: within 2 points)
#   slicing        throughput slicing's share of the oracle's gain (goal >= 90 %)
# On the 2-core development machine the four took 20, 31, 33 and 62 s.
# Exit status: 0 all ran, 3 one ran out of its time, 1 one failed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out=results/cpu-goals
seconds=240
python=python3
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
# fastpar from this checkout, installed or not (as the GPU check runs it).
export PYTHONPATH="$(dirname "$here"):$here${PYTHONPATH:+:$PYTHONPATH}"

# name, share of the time (percent), arguments
benches=(
    "allreduce 15 allreduce.py --ranks 2 --sizes 16384 65536 262144"
    "data_parallel 20 data_parallel.py --ranks 2 --steps 30"
    "pipeline 25 pipeline.py --steps 40"
    "slicing 40 slicing.py --rounds 3"
)
status=0
for entry in "${benches[@]}"; do
    read -r name share script args <<<"$entry"
    limit=$((seconds * share / 100))
    echo "===== $name (up to ${limit} s) ====="
    # shellcheck disable=SC2086  # args are words
    timeout --kill-after=10 "$limit" "$python" "$here/$script" $args --csv "$out/$name.csv" \
        >"$out/$name.log" 2>&1
    rc=$?
    case "$rc" in
        0) tail -n 30 "$out/$name.log" ;;
        124 | 137) echo "$name: out of time after ${limit} s (log: $out/$name.log)"; [ "$status" -eq 0 ] && status=3 ;;
        *) echo "$name: exit $rc (log: $out/$name.log)"; tail -n 20 "$out/$name.log"; status=1 ;;
    esac
done
exit "$status"
