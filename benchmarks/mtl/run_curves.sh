#!/usr/bin/env bash
# The learning curves as K processes sharing one GPU and one OUT (--shard i/K: every K-th
# (variant, seed) each), each stopped after LIMIT seconds by SIGTERM, on which a training run
# saves its last finished step; then a --collect pass writes OUT/results.md, results.json and
# plots/ from whatever budget files exist. Each process brings all its runs to the smallest budget
# (trained, then scored at once: OUT/runs/<variant>-seed<s>/budget-<N>.json) before any goes on to
# the next, so a stopped call leaves every run at the same depth with its budgets scored. Run it
# again (same options, or more budgets) to continue: scored budgets are kept, a killed run resumes
# from its newest checkpoint, a new larger budget from the largest one trained.
#
# FROM=benchmarks/raw/mtl_curves first copies that committed folder's budget files (by_run/) and
# base scores into OUT, on a fresh machine, so only the budgets still missing are trained (from
# step 0: the checkpoints stay on the machine that made them).
#
# SNAP=FILE (e.g. $OUT/curves.tgz on the GPU machine) writes OUT's budget files, logs and base
# scores to FILE every 30 s (a temporary file, then renamed), so a call whose machine is taken back
# before it ends still returns what it had scored; without it a lost machine loses the whole call.
#
# A process still running GRACE seconds after its SIGTERM (one that lost the signal) is killed;
# what it had scored stays, and its run resumes from its newest checkpoint. The call takes at most
# LIMIT + GRACE seconds and the --collect pass.
#
#   [PYTHON=python3] [K=12] [LIMIT=510] [GRACE=30] [FROM=DIR] [SNAP=FILE] benchmarks/mtl/run_curves.sh TASKS_DIR \
#       MODEL OUT --budgets 150,300,600,1200 [more python -m benchmarks.mtl options]
set -u
py=${PYTHON:-python3} k=${K:-12} limit=${LIMIT:-510} grace=${GRACE:-30}
tasks=$1 model=$2 out=$3
shift 3
mkdir -p "$out/logs" "$out/runs" "$out/base"
if [ -n "${FROM:-}" ]; then
  [ -d "$FROM/by_run" ] && cp -rn "$FROM/by_run/." "$out/runs/"
  [ -d "$FROM/base" ] && cp -n "$FROM/base/"seed*.json "$out/base/"
fi
for i in $(seq 1 "$k"); do
  timeout -s TERM -k "$grace" "$limit" "$py" -m benchmarks.mtl --tasks-dir "$tasks" --model "$model" --out "$out" \
    --shard "$i/$k" "$@" >>"$out/logs/shard$i.log" 2>&1 &
done
snapshot() {
  # --ignore-failed-read: settings.json appears only once a shard has started
  tar czf "$SNAP.part" -C "$out" --ignore-failed-read runs logs base settings.json 2>/dev/null && mv "$SNAP.part" "$SNAP"
}
if [ -n "${SNAP:-}" ]; then
  (while sleep 30; do snapshot; done) &
  snapper=$!
fi
wait $(jobs -p | grep -vx "${snapper:-none}")
if [ -n "${SNAP:-}" ]; then
  kill "$snapper" 2>/dev/null
  snapshot
fi
"$py" -m benchmarks.mtl --collect --out "$out" >"$out/logs/collect.log" 2>&1
tail -n 40 "$out/results.md"
