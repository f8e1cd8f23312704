#!/usr/bin/env bash
# One-off second GPU run of this session (not committed): the failures of the first, then timings.
set -u
R=/tmp/r2; rm -rf "$R"; mkdir -p "$R"
export PYTHONUNBUFFERED=1
py=python3
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
run() { local name=$1 lim=$2; shift 2; ( timeout "$lim" "$@" > "$R/$name.log" 2>&1; echo "rc $?" >> "$R/$name.log" ) & }
P="-q -rfE -p no:cacheprovider"
( timeout 120 $py -m fastpar build > "$R/build.log" 2>&1; echo "rc $?" >> "$R/build.log" ) & B=$!
run lstm_gpu 165 $py -m pytest -m gpu tests/ops/test_lstm_gpu.py $P --durations=5
run rnn_triton 165 $py -m pytest -m gpu tests/ops/test_rnn_triton.py $P --durations=5
run nn 165 $py -m pytest -m gpu tests/nn $P --durations=8 --timeout 120
wait $B; el build; tail -2 "$R/build.log"
run ring 115 $py -m pytest -m gpu tests/comm/test_ring_cuda.py $P --durations=8 --timeout 60
run pipe 115 $py -m pytest -m gpu tests/parallel/test_pipeline_gpu.py $P --durations=3 --timeout 60
wait; el tests
for f in "$R"/*.log; do echo "== $(basename "$f")"; grep -E "passed|failed|error|rc [0-9]" "$f" | tail -3; done
timeout 100 $py bench/lstm.py --device cuda --scale gpu --csv "$R/lstm.csv" --table "$R/lstm.txt" > "$R/bench.log" 2>&1; el bench
FASTPAR_LSTM_TILES=v2 timeout 35 $py bench/lstm.py --device cuda --scale gpu --quick --csv "$R/lstm_v2tiles.csv" --table "$R/lstm_v2tiles.txt" > "$R/bench_v2.log" 2>&1; el bench-v2
tar czf "$OUT/r2.tgz" -C "$R" .
cat "$R/lstm.txt" "$R/lstm_v2tiles.txt" 2>/dev/null | cut -c1-200
