"""Multi-task benchmark: LoRA, MultiLoRA, HydraLoRA, R-LoRA and R-LoRA's ablations trained on a
mixture of BIG-bench tasks and scored on each task's held-out examples, over several seeds.

    make bigbench-data                                   # data/bigbench/<task>/task.json
    python -m benchmarks.mtl --tasks-dir data/bigbench --model /models/SmolLM2-135M-Instruct \
        --seeds 0,1,2 --out runs/mtl                     # on the GPU machine
    python -m benchmarks.mtl --smoke --out /tmp/mtl      # CPU, tiny model, two tiny tasks, < 1 min
    python -m benchmarks.mtl ... --fold                  # + router variants folded per task

Learning curves: one run per (variant, seed) at a constant learning rate after a fixed warm-up
(--warmup-steps), trained one budget at a time (max_steps = the next budget, resumed from the
last one's checkpoint: the same run as one planned to the largest budget) and scored as soon as
each budget is reached (routed, and folded per task for router variants), one file per budget.
Each process brings all its (variant, seed) pairs to one budget before any goes further, so a
call stopped at any time leaves every pair at the same depth; k processes share one GPU and one
OUT (`--shard i/k`), a killed one continues where it stopped, budgets may grow between calls, and
`--collect` writes the report of whatever budget files exist (benchmarks/mtl/run_curves.sh runs
all of it):

    for i in $(seq 1 12); do timeout -k 30 -s TERM 510 python -m benchmarks.mtl --tasks-dir DIR \
        --model PATH --budgets 150,300,600,1200 --shard $i/12 --out OUT & done; wait
    python -m benchmarks.mtl --collect --out OUT
    python -m benchmarks.mtl --smoke --budgets 2,4 --out /tmp/curves   # CPU, the same end to end
    python -m benchmarks.mtl.report benchmarks/raw/mtl_curves --out /tmp/r   # tables from committed files

`plan.py` says what runs (variants, budgets, recipes), `run.py` runs it (train with
`rlora_cli.training.loop`, score with `rlora_cli.eval.recipe_tasks`; OUT's layout is in its
docstring), `budgets.py` trains and scores the learning curves, `report.py` writes the table and
plots (and rebuilds them from a folder's files), `curves.py` reads the learning curves' files and
`report_curves.py` renders them, `stats.py` holds the paired bootstrap, `smoke.py` the smoke
setting, `fetch_bigbench.py` extracts BIG-bench's task files. With `--fold`, each router variant
(hydralora, rlora, ...) is scored a second time with the router fixed to each task's fold
(`rlora_cli.fold`: what `rlora merge --task` would write), in the row "<variant> (folded)" of the
table.
"""
