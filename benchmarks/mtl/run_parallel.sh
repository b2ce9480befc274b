#!/usr/bin/env bash
# The multi-task benchmark as six processes sharing one OUT folder: one run of a 135M model
# leaves the GPU mostly idle (the host issues the kernels), so runs side by side cost little
# more wall time than one. Each process takes one seed and half of the variants; finished runs
# are kept, so the last pass, over every variant and seed, only collects them into
# OUT/results.md, OUT/results.json and OUT/plots (and trains whatever an interrupted pass left).
#
# The two processes of a seed both score the base model on it (same result, written atomically).
#
#   [PYTHON=.venv/bin/python] benchmarks/mtl/run_parallel.sh TASKS_DIR MODEL OUT [more python -m benchmarks.mtl options]
set -u
py=${PYTHON:-python3}
tasks=$1 model=$2 out=$3
shift 3
mkdir -p "$out/logs"
for seed in 0 1 2; do
  for methods in lora,lora-matched,multilora,hydralora hydralora-ri,hydralora-hd,rlora,rlora-router-off; do
    "$py" -m benchmarks.mtl --tasks-dir "$tasks" --model "$model" --out "$out" --seeds "$seed" \
      --methods "$methods" "$@" >"$out/logs/seed$seed-${methods%%,*}.log" 2>&1 &
  done
done
wait
"$py" -m benchmarks.mtl --tasks-dir "$tasks" --model "$model" --out "$out" --seeds 0,1,2 "$@"
