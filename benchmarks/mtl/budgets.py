"""Learning curves: each (variant, seed) trained a segment at a time, one budget per segment, and
each budget scored as soon as it is reached, its result file written at once.

    python -m benchmarks.mtl --tasks-dir DIR --model PATH --budgets 150,300,600,1200 [--shard i/k] --out OUT

    OUT/train/<variant>-seed<s>/                the rlora run folder: checkpoint-<N>/ at every budget
                                                (and every plan.checkpoint_every steps), all kept
    OUT/runs/<variant>-seed<s>/budget-<N>.json  budget N: per task accuracy, n, correct and
                                                example_keys (held-out order), "folded" (router
                                                variants: the same with the router fixed to each
                                                task's fold, the folds and their per-module usage),
                                                "mean_accuracy", trainable parameters, the training
                                                loss logged at N and the held-out loss per task at
                                                N, "gates" (MultiLoRA: |g_i| per head, gate_summary),
                                                "eval_s", provenance (host, GPU, RLORA_BENCH_CALL,
                                                time, versions)
    OUT/runs/<variant>-seed<s>/metrics.jsonl, run_info.json   copies of the run's own (small)

Breadth first (`run_curves`): a process brings every (variant, seed) it holds to its smallest
budget, trained and scored, before any goes to the next, so a process stopped at any moment leaves
every run at the same depth, the earlier budgets scored for every variant. A segment trains the
recipe with train.max_steps set to the budget, resuming the run folder from the previous budget's
checkpoint (train.max_steps may change on resume); the warm-up is a fixed number of steps and the
learning rate constant after it, so the segments give the run planned to the largest budget
(tests/benchmarks/test_mtl.py checks it on the CPU), and a budget added later (OUT's budgets may
grow) continues from the largest one trained.

The files are the queue: a budget with its budget-<N>.json is done and never scored again. A
process killed while training (`timeout` sends SIGTERM, on which the trainer saves its last
finished step) resumes from its newest sound checkpoint before the budget when started again; one
killed while scoring scores the checkpoint it had reached. A run folder with no checkpoint before
the first missing budget is trained again from step 0: after a move to a new machine, say, the
budget files copied back into OUT/runs stay, and the budgets still missing are trained and scored
anew (run_curves.sh's FROM= copies a committed folder's files in).

A router variant's budget costs two scoring passes over the held-out examples (routed; each task
with its fold) and one routing pass (a forward per held-out example) whose per-module mixtures give
both the folds and their per-module usage.
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

from rlora_cli.adapters import MultiHeadLoRA
from rlora_cli.checkpoint import read_adapter_config
from rlora_cli.eval.recipe_tasks import prepare_recipe, run_recipe
from rlora_cli.eval.run import score_measured_folds
from rlora_cli.files import atomic_write_text
from rlora_cli.fold import Fold, FoldPlan, measure_folds, plan_folds
from rlora_cli.model import load_with_adapter
from rlora_cli.report.analyze import gate_stats
from rlora_cli.routing import entropy
from rlora_cli.runs import CHECKPOINT_PREFIX, checkpoint_step, read_metrics
from rlora_cli.training.loop import train
from rlora_cli.training.rundir import checkpoint_damage, complete_checkpoints

from . import plan

LOGS = ("metrics.jsonl", "run_info.json")  # copied next to the budget files: the report reads them


def budget_file(budget: int) -> str:
    return f"budget-{budget}.json"


def run_curves(pairs: list[tuple[str, int]], recipes: dict[tuple[str, int], Path], out: Path,
               settings: plan.Settings, console: Any) -> None:
    """Every (variant, seed) of `pairs` to each budget in turn, breadth first."""
    inputs: dict[Path, dict[str, Any]] = {}  # per recipe: its held-out rows, read once per process
    for budget in settings.budgets:
        for method, seed in pairs:
            reach(method, seed, budget, recipes[(method, seed)], out, settings, inputs, console)


def reach(method: str, seed: int, budget: int, recipe_path: Path, out: Path, settings: plan.Settings,
          inputs: dict[Path, dict[str, Any]], console: Any) -> None:
    """Train one (variant, seed) to `budget` and score it, unless it was scored before."""
    name = f"{method}-seed{seed}"
    results, run_dir = out / "runs" / name, out / "train" / name
    if (results / budget_file(budget)).is_file():
        return
    console.rule(f"{method}, seed {seed}: budget {budget}")
    train_to(run_dir, recipe_path, budget, console)
    for log in LOGS:
        if (run_dir / log).is_file():
            atomic_write_text(results / log, (run_dir / log).read_text())
    if recipe_path not in inputs:
        inputs[recipe_path] = read_inputs(method, recipe_path, run_dir / f"{CHECKPOINT_PREFIX}{budget}")
    score_budget(method, seed, budget, run_dir, results, inputs[recipe_path], settings, console)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the scoring's cached blocks back to the processes sharing the GPU


def train_to(run_dir: Path, recipe_path: Path, budget: int, console: Any) -> None:
    """One segment: train until checkpoint-<budget> is in `run_dir`, from the newest sound
    checkpoint before it (from step 0 when there is none)."""
    sound = {checkpoint_step(c): c for c in complete_checkpoints(run_dir) if checkpoint_damage(c) is None} \
        if run_dir.is_dir() else {}
    if budget in sound:  # killed while scoring: the checkpoint is there
        return
    before = [step for step in sound if step < budget]
    start = str(sound[max(before)]) if before else None
    train(recipe_path, (f"train.max_steps={budget}",), output=run_dir, resume=start or "never",
          overwrite=start is None, console=console)


def read_inputs(method: str, recipe_path: Path, checkpoint: Path) -> dict[str, Any]:
    """The recipe's held-out rows as scoring reads them, and for a router variant the rows its
    folds are measured on; the same at every budget, so read once."""
    adapter = checkpoint / "adapter"
    folds = plan_folds(adapter, read_adapter_config(adapter), None, recipe=recipe_path) \
        if plan.routed(method) else None
    return {"prepared": prepare_recipe(str(recipe_path), None), "folds": folds}


def score_budget(method: str, seed: int, budget: int, run_dir: Path, results: Path, inputs: dict[str, Any],
                 settings: plan.Settings, console: Any) -> Path:
    """Score checkpoint-<budget>'s adapter (and its folds, for a router variant); write its file."""
    adapter = run_dir / f"{CHECKPOINT_PREFIX}{budget}" / "adapter"
    start = time.perf_counter()
    lm, tokenizer, _ = load_with_adapter(None, str(adapter), dtype=settings.dtype)
    prepared = inputs["prepared"]
    tasks = run_recipe(lm, tokenizer, prepared, batch_size=settings.eval_batch_size, console=console)
    info = json.loads((run_dir / "run_info.json").read_text())
    record = {"method": method, "seed": seed, "budget": budget,
              "trainable_parameters": info["trainable_parameters"],
              "tasks": tasks, "mean_accuracy": mean_accuracy(tasks),
              **logged_at(run_dir / "metrics.jsonl", budget)}
    if (gates := gate_summary(lm)) is not None:
        record["gates"] = gates
    if inputs["folds"] is not None:
        record["folded"] = score_folded(lm, tokenizer, inputs["folds"], prepared, settings, console)
    record["eval_s"] = round(time.perf_counter() - start, 2)
    record["provenance"] = provenance()
    path = results / budget_file(budget)
    atomic_write_text(path, dumps(record))
    return path


def gate_summary(model: torch.nn.Module) -> dict[str, Any] | None:
    """MultiLoRA's scalar gates at this budget: per head, the mean |g_i| over the adapted modules,
    and the largest |g_i| of any (`rlora analyze` shows the same per module). Zero-init gates that
    never moved read as zeros here, so a MultiLoRA that did not train shows in every budget file.
    None for a model without scalar gates."""
    gates = [m.rlora_gate.detach().abs().double().tolist() for m in model.modules()
             if isinstance(m, MultiHeadLoRA) and m.spec.gate == "scalar"]
    return {"modules": len(gates), **gate_stats(gates)} if gates else None


def score_folded(lm: Any, tokenizer: Any, fold_plan: FoldPlan, prepared: dict[str, Any],
                 settings: plan.Settings, console: Any) -> dict[str, Any]:
    """Each task scored with the router fixed to its fold (`rlora eval --compare-routed`'s
    numbers: what `rlora merge --task` would write), the folds' summaries, and their usage per
    module. The routing is measured once: each fold's per-module mixtures are what the router is
    fixed to and what the usage is computed from."""
    folds = measure_folds(lm, tokenizer, fold_plan, batch_size=settings.eval_batch_size, console=console)
    tasks = score_measured_folds(folds, prepared, lm, tokenizer, settings.eval_batch_size, console)
    return {"tasks": tasks, "mean_accuracy": mean_accuracy(tasks),
            "folds": {name: fold.info() for name, fold in folds.items()}, "usage": usage(folds)}


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


def logged_at(metrics: Path, budget: int) -> dict[str, Any]:
    """{"train_loss": the last training-loss row logged at or before `budget` (its step, loss, and
    router_entropy when the log has it), "eval_loss": the held-out loss per task logged at
    `budget` (the end of its segment)}, each None when the log has none."""
    rows = read_metrics(metrics) if metrics.is_file() else []
    losses = [r for r in rows if "loss" in r and r.get("step", budget + 1) <= budget]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r and r.get("step") == budget]
    train_loss = {k: losses[-1][k] for k in ("step", "loss", "router_entropy") if k in losses[-1]} \
        if losses else None
    return {"train_loss": train_loss, "eval_loss": evals[-1] if evals else None}


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
