#!/usr/bin/env bash
# One GPU check, under 8 minutes, installing nothing: the tests marked gpu, then the benchmarks,
# with their tables printed last. Runs with the machine's python3 (torch, triton, pytest).
#
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p results
rm -f results/lstm.txt results/allreduce.txt  # never print a table left from an earlier run
status=0

# Budget (the whole script stays under 8 minutes): build 110 s, tests 160 s, LSTM 140 s,
# all-reduce 60 s.
echo "== python3 -m fastpar build (C++ and CUDA sources) =="
timeout 110 python3 -m fastpar build || status=$?

echo "== pytest -m gpu =="
timeout 160 python3 -m pytest -m gpu -q -p no:cacheprovider || status=$?

echo "== bench/lstm.py =="
timeout 140 python3 bench/lstm.py --csv results/lstm.csv --table results/lstm.txt || status=$?

echo "== bench/allreduce.py =="
timeout 60 python3 bench/allreduce.py --device cuda --ranks 2 --max-bytes 16777216 --samples 5 \
    --max-calls 10 --csv results/allreduce.csv --table results/allreduce.txt || status=$?

echo
echo "== tables =="
for table in results/lstm.txt results/allreduce.txt; do
    if [ -f "$table" ]; then
        echo "-- $table"
        cat "$table"
    fi
done
exit "$status"
