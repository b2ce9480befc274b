"""Learning curves: each (variant, seed) trained once to the largest budget, each budget's checkpoint
scored, one result file per budget written as soon as it is scored.

    python -m benchmarks.mtl --tasks-dir DIR --model PATH --budgets 150,300,600,1200 [--shard i/k] --out OUT

    OUT/train/<variant>-seed<s>/                the rlora run folder: checkpoint-<N>/ at every multiple
                                                of the budgets' gcd, all kept (plan.recipe)
    OUT/runs/<variant>-seed<s>/budget-<N>.json  budget N: per task accuracy, n, correct and
                                                example_keys (held-out order), "folded" (router
                                                variants: the same with the router fixed to each
                                                task's fold, the folds and their per-module usage),
                                                trainable parameters, the training loss logged at N,
                                                provenance (host, GPU, RLORA_BENCH_CALL, time, versions)
    OUT/runs/<variant>-seed<s>/metrics.jsonl, run_info.json   copies of the run's own (small)

The files are the queue: a budget with its budget-<N>.json is done and never scored again. A
process killed while training (`timeout` sends SIGTERM, on which the trainer saves its last
finished step) resumes from the newest complete checkpoint when started again with the same
options; one killed while scoring scores the budgets still missing. A run folder with no
checkpoint before the first missing budget is trained again from step 0: after a move to a new
machine, say, the budget files copied back into OUT/runs stay, and the budgets still missing are
trained and scored anew (run_curves.sh's FROM= copies a committed folder's files in). The budgets
belong to OUT's settings.json like every other setting: other budgets need another OUT.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

from rlora_cli.checkpoint import read_adapter_config
from rlora_cli.eval.recipe_tasks import prepare_recipe, run_recipe
from rlora_cli.eval.run import score_folds
from rlora_cli.files import atomic_write_text
from rlora_cli.fold import Fold, measure_folds, plan_folds
from rlora_cli.model import load_with_adapter
from rlora_cli.routing import entropy
from rlora_cli.runs import CHECKPOINT_PREFIX, checkpoint_step
from rlora_cli.training.loop import train
from rlora_cli.training.rundir import complete_checkpoints

from . import plan

LOGS = ("metrics.jsonl", "run_info.json")  # copied next to the budget files: the report reads them


def budget_file(budget: int) -> str:
    return f"budget-{budget}.json"


def train_and_score(method: str, seed: int, recipe_path: Path, out: Path, settings: plan.Settings,
                    console: Any) -> list[Path]:
    """Train one (variant, seed) as far as its missing budgets need, then score each of them;
    returns the budget files written."""
    name = f"{method}-seed{seed}"
    results, run_dir = out / "runs" / name, out / "train" / name
    todo = [n for n in settings.budgets if not (results / budget_file(n)).is_file()]
    if not todo:
        console.print(f"[dim]{name}: every budget scored before, kept[/]")
        return []
    console.rule(f"{method}, seed {seed}: budget{'s' if len(todo) > 1 else ''} {', '.join(map(str, todo))}")
    train_to(run_dir, recipe_path, todo, console)
    for log in LOGS:
        if (run_dir / log).is_file():
            atomic_write_text(results / log, (run_dir / log).read_text())
    return [score_budget(method, seed, n, recipe_path, run_dir, results, settings, console) for n in todo]


def train_to(run_dir: Path, recipe_path: Path, budgets: list[int], console: Any) -> None:
    """Train until each of `budgets` has its checkpoint in `run_dir`."""
    have = {checkpoint_step(c): c for c in complete_checkpoints(run_dir)} if run_dir.is_dir() else {}
    missing = [n for n in budgets if n not in have]
    if not missing:
        return
    before = [step for step in have if step < missing[0]]
    if not before:  # nothing to continue from: start over
        resume, overwrite = "never", True
    elif max(have) < missing[0]:  # a killed run (auto also steps over a damaged newest checkpoint)
        resume, overwrite = "auto", False
    else:  # a budget's checkpoint is gone but later ones are there: retrain from the one before it
        resume, overwrite = str(have[max(before)]), False
    train(recipe_path, output=run_dir, resume=resume, overwrite=overwrite, console=console)


def score_budget(method: str, seed: int, budget: int, recipe_path: Path, run_dir: Path, results: Path,
                 settings: plan.Settings, console: Any) -> Path:
    """Score checkpoint-<budget>'s adapter (and its folds, for a router variant); write its file."""
    adapter = run_dir / f"{CHECKPOINT_PREFIX}{budget}" / "adapter"
    start = time.perf_counter()
    lm, tokenizer, _ = load_with_adapter(None, str(adapter), dtype=settings.dtype)
    prepared = prepare_recipe(str(recipe_path), None)
    tasks = run_recipe(lm, tokenizer, prepared, batch_size=settings.eval_batch_size, console=console)
    info = json.loads((run_dir / "run_info.json").read_text())
    record = {"method": method, "seed": seed, "budget": budget,
              "trainable_parameters": info["trainable_parameters"],
              "tasks": tasks, "mean_accuracy": mean_accuracy(tasks),
              "train_loss": loss_at(run_dir / "metrics.jsonl", budget)}
    if plan.routed(method):
        record["folded"] = score_folded(lm, tokenizer, adapter, recipe_path, prepared, settings, console)
    record["eval_s"] = round(time.perf_counter() - start, 2)
    record["provenance"] = provenance()
    path = results / budget_file(budget)
    atomic_write_text(path, dumps(record))
    return path


def score_folded(lm: Any, tokenizer: Any, adapter: Path, recipe_path: Path, prepared: dict[str, Any],
                 settings: plan.Settings, console: Any) -> dict[str, Any]:
    """Each task scored with the router fixed to its fold (`rlora eval --compare-routed`'s
    numbers: what `rlora merge --task` would write), the folds' summaries, and their usage per
    module. score_folds measures the folds itself and keeps only their module-averaged mixtures;
    they are measured once more here for the per-module ones (one forward per held-out example,
    small beside the scoring)."""
    fold_plan = plan_folds(adapter, read_adapter_config(adapter), None, recipe=recipe_path)
    tasks, infos = score_folds(fold_plan, prepared, lm, tokenizer, settings.eval_batch_size, console)
    folds = measure_folds(lm, tokenizer, fold_plan, batch_size=settings.eval_batch_size)
    return {"tasks": tasks, "mean_accuracy": mean_accuracy(tasks), "folds": infos, "usage": usage(folds)}


def usage(folds: dict[str, Fold]) -> dict[str, Any]:
    """Per task, the mean over modules of its mixture's entropy (nats; ln n = uniform); per pair of
    tasks, the mean over modules of the L1 distance between their mixtures (0 = the same use of
    the heads, 2 = disjoint heads). Per module, so two tasks that favour different heads in
    different layers are not averaged into the same mixture."""
    names = list(folds)
    modules = list(folds[names[0]].per_module) if names else []

    def over_modules(f: Any) -> float:
        return sum(f(m) for m in modules) / len(modules) if modules else 0.0

    def l1(a: str, b: str, m: str) -> float:
        return sum(abs(x - y) for x, y in zip(folds[a].per_module[m], folds[b].per_module[m]))

    return {"module_entropy": {t: over_modules(lambda m: entropy(folds[t].per_module[m])) for t in names},
            "pairwise_l1": [{"tasks": [a, b], "l1": over_modules(lambda m: l1(a, b, m))}
                            for i, a in enumerate(names) for b in names[i + 1:]]}


def loss_at(metrics: Path, budget: int) -> dict[str, Any] | None:
    """The last training-loss row logged at or before `budget` (its step, loss, and
    router_entropy when the log has it)."""
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    logged = [r for r in rows if "loss" in r and r.get("step", budget + 1) <= budget]
    if not logged:
        return None
    row = logged[-1]
    return {k: row[k] for k in ("step", "loss", "router_entropy") if k in row}


def provenance() -> dict[str, Any]:
    """Where and when a result was computed: which machine, GPU and call, and the versions."""
    return {"host": socket.gethostname(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "call": os.environ.get("RLORA_BENCH_CALL", ""),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def mean_accuracy(tasks: dict[str, dict[str, Any]]) -> float | None:
    values = [r["accuracy"] for r in tasks.values() if r.get("accuracy") is not None]
    return sum(values) / len(values) if values else None


def dumps(data: Any, indent: int = 0) -> str:
    """JSON with one key per line, but a list of numbers or strings on one line (the per-example
    lists would otherwise take a line per example)."""
    pad = " " * (indent + 1)
    if isinstance(data, dict) and data:
        items = [f"{pad}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}" + ("\n" if indent == 0 else "")
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        items = [pad + dumps(v, indent + 1) for v in data]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(data)
