"""Multi-task benchmark: LoRA, MultiLoRA, HydraLoRA, R-LoRA and R-LoRA's ablations trained on a
mixture of BIG-bench tasks and scored on each task's held-out examples, over several seeds.

    make bigbench-data                                   # data/bigbench/<task>/task.json
    python -m benchmarks.mtl --tasks-dir data/bigbench --model /models/SmolLM2-135M-Instruct \
        --seeds 0,1,2 --out runs/mtl                     # on the GPU machine
    python -m benchmarks.mtl --smoke --out /tmp/mtl      # CPU, tiny model, two tiny tasks, < 1 min
    python -m benchmarks.mtl ... --fold                  # + router variants folded per task

`plan.py` says what runs (variants, budgets, recipes), `run.py` runs it (train with
`rlora_cli.training.loop`, score with `rlora_cli.eval.recipe_tasks`), `report.py` writes the table and plots,
`smoke.py` holds the smoke setting, `fetch_bigbench.py` extracts BIG-bench's task files. With
`--fold`, each router variant (hydralora, rlora, ...) is scored a second time with the router
fixed to each task's fold (`rlora_cli.fold`: what `rlora merge --task` would write), in the row
"<variant> (folded)" of the table.
"""
