#!/usr/bin/env bash
# The learning curves as K processes sharing one GPU and one OUT (--shard i/K: every K-th
# (variant, seed) each), each stopped after LIMIT seconds by SIGTERM, on which a training run
# saves its last finished step; then a --collect pass writes OUT/results.md, results.json and
# plots/ from whatever budget files exist. Run it again (same options) to continue: finished
# budgets are kept, killed runs resume from their newest checkpoint.
#
# FROM=benchmarks/raw/mtl_curves first copies that committed folder's budget files (by_run/) and
# base scores into OUT, on a fresh machine, so only the budgets still missing are trained.
#
#   [PYTHON=python3] [K=12] [LIMIT=540] [FROM=DIR] benchmarks/mtl/run_curves.sh TASKS_DIR MODEL OUT \
#       --budgets 150,300,600,1200 [more python -m benchmarks.mtl options]
set -u
py=${PYTHON:-python3} k=${K:-12} limit=${LIMIT:-540}
tasks=$1 model=$2 out=$3
shift 3
mkdir -p "$out/logs" "$out/runs" "$out/base"
if [ -n "${FROM:-}" ]; then
  [ -d "$FROM/by_run" ] && cp -rn "$FROM/by_run/." "$out/runs/"
  [ -d "$FROM/base" ] && cp -n "$FROM/base/"seed*.json "$out/base/"
fi
for i in $(seq 1 "$k"); do
  timeout -s TERM "$limit" "$py" -m benchmarks.mtl --tasks-dir "$tasks" --model "$model" --out "$out" \
    --shard "$i/$k" "$@" >>"$out/logs/shard$i.log" 2>&1 &
done
wait
"$py" -m benchmarks.mtl --collect --out "$out" >"$out/logs/collect.log" 2>&1
tail -n 40 "$out/results.md"
