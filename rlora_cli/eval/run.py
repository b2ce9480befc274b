"""`rlora eval`: benchmarks and the recipe's held-out tasks, one results-file shape for all.

    rlora eval --task mmlu --model Qwen/Qwen2.5-0.5B --adapter runs/mixed/adapter --limit 50
    rlora eval --task bbh --data bigbench/ --shots 3 --output bbh.json
    rlora eval --task recipe --recipe recipes/mixed.yaml --adapter runs/mixed/adapter
    rlora eval --backend lm-eval --task hellaswag --model runs/merged

`evaluate(...)` checks the options and loads the data first (bad input fails before a model is
loaded), then the model (`model.load_with_adapter`: base + adapter, or a merged folder), scores
every task with `scoring.py`, renders the table (`report/eval.py`) and writes the results file
(`results.results_dict`). MMLU data lives in `benchmarks.py`, BIG-bench files in
`data/bigbench.py`, the recipe task in `recipe_tasks.py`, the lm-eval backend in `lm_eval.py`;
`rlora eval compare` is `results.compare`. `--compare-routed` (a routed adapter, --task recipe)
scores each task again with the router fixed to that task's fold (`fold.py`: the mixture its
merge or PEFT export would hold) and reports routed vs folded (`results.routed_vs_folded`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rlora_cli.adapters import AdapterConfig
from rlora_cli.checkpoint import read_adapter_config
from rlora_cli.config import canonical_dtype
from rlora_cli.data.bigbench import (
    bigbench_choices,
    bigbench_files,
    bigbench_prompt,
    bigbench_targets,
    load_bigbench,
)
from rlora_cli.errors import UserError
from rlora_cli.eval import lm_eval
from rlora_cli.eval.benchmarks import LETTERS, load_mmlu, mmlu_prompt
from rlora_cli.eval.recipe_tasks import prepare_recipe, run_recipe
from rlora_cli.eval.results import results_dict, routed_vs_folded
from rlora_cli.eval.scoring import decode, loglikelihoods, task_record
from rlora_cli.files import atomic_write_text, check_output_file
from rlora_cli.fold import FoldPlan, measure_folds, plan_folds, set_mixtures
from rlora_cli.model import load_with_adapter
from rlora_cli.report.eval import (
    print_results,
    print_routed_vs_folded,
    print_warnings,
    print_written,
    progress,
)
from rlora_cli.runs import adapter_dir

TASKS = ("mmlu", "bbh", "recipe")
BACKENDS = ("rlora", "lm-eval")


def evaluate(task: str, *, model: str | None = None, adapter: str | None = None,
             data: str | None = None, shots: int | None = None, limit: int | None = None,
             subjects: list[str] | None = None, recipe: str | None = None, batch_size: int = 8,
             backend: str = "rlora", dtype: str = "auto", output: str | None = None,
             trust_remote_code: bool = False, compare_routed: bool = False,
             console: Any = None) -> dict[str, Any]:
    """Run one evaluation and return the results dict (also written to `output` when given).

    The table, warnings and progress go to `console`; without one nothing is printed."""
    start = time.perf_counter()
    if output:
        check_output_file(output, "--output")  # now, not after the whole evaluation
    adapter = adapter_dir(adapter) if adapter else None
    if task == "recipe" and not recipe and adapter and (Path(adapter).parent / "recipe.yaml").is_file():
        recipe = str(Path(adapter).parent / "recipe.yaml")  # RUN/adapter: the run's resolved recipe
    _check_args(task, backend, shots, limit, batch_size, data, recipe)
    dtype = canonical_dtype(dtype, "--dtype")
    if backend == "lm-eval":
        lm_eval.require_lm_eval()
        prepared: dict[str, Any] = {}
    else:
        prepared = _prepare(task, data, shots, limit, subjects, recipe, adapter)
    folds = _plan_compare(task, backend, adapter, recipe) if compare_routed else None
    lm, tokenizer, info = load_with_adapter(model, adapter, dtype=dtype, default=prepared.get("model"),
                                            trust_remote_code=trust_remote_code)
    print_warnings(info.warnings, console)
    if backend == "lm-eval":
        names = [t.strip() for t in task.split(",") if t.strip()]
        tasks = lm_eval.lm_eval_tasks(lm_eval.run_lm_eval(lm, tokenizer, names, shots=shots, limit=limit,
                                                          batch_size=batch_size))
    else:
        tasks = _run(task, prepared, lm, tokenizer, batch_size, console)
    folded = score_folds(folds, prepared, lm, tokenizer, batch_size, console) if folds else None
    results = results_dict(task, info.base, adapter, default_shots(task, shots, backend), limit,
                           time.perf_counter() - start, tasks)
    print_results(results, console)
    if folded is not None:
        results["routed_vs_folded"] = routed_vs_folded(tasks, *folded)
        print_routed_vs_folded(results["routed_vs_folded"], console)
    if output:
        atomic_write_text(output, json.dumps(results, indent=2) + "\n")
        print_written("results", output, console)
    return results


def _plan_compare(task: str, backend: str, adapter: str | None, recipe: str | None) -> FoldPlan:
    """--compare-routed: the rows of every task's fold, read before the model loads."""
    config = read_adapter_config(adapter) if adapter else None
    if task != "recipe" or backend != "rlora" or config is None \
            or not AdapterConfig.from_dict(config["adapter"]).has_router:
        raise UserError("--compare-routed compares a routed adapter with its per-task folds",
                        "use it with --task recipe and --adapter of a hydralora/rlora run (router: softmax)")
    return plan_folds(Path(adapter), config, None, recipe=recipe)  # type: ignore[arg-type]


def score_folds(plan: FoldPlan, prepared: dict[str, Any], lm: Any, tokenizer: Any, batch_size: int,
                 console: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """({task: its held-out record with the router fixed to the task's fold}, {task: fold info})."""
    folds = measure_folds(lm, tokenizer, plan, batch_size=batch_size, console=console)
    scored = score_measured_folds(folds, prepared, lm, tokenizer, batch_size, console)
    return scored, {name: fold.info() for name, fold in folds.items()}


def score_measured_folds(folds: dict[str, Any], prepared: dict[str, Any], lm: Any, tokenizer: Any,
                         batch_size: int, console: Any) -> dict[str, dict[str, Any]]:
    """{task: its held-out record with the router fixed to the task's fold}, for folds already
    measured (`fold.measure_folds`)."""
    scored = {}
    for name, fold in folds.items():
        set_mixtures(lm, fold)
        try:
            one = {**prepared, "val": {name: prepared["val"].get(name, [])}}
            scored.update(run_recipe(lm, tokenizer, one, batch_size=batch_size, console=console))
        finally:
            set_mixtures(lm, None)
    return scored


def default_shots(task: str, shots: int | None, backend: str = "rlora") -> int | None:
    """The shot count used: --shots, else 5 for MMLU and 0 for BIG-bench (lm-eval: each task's
    default); None for the recipe task, which has no shots."""
    if backend == "lm-eval":
        return shots
    if task == "recipe":
        return None
    return shots if shots is not None else {"mmlu": 5, "bbh": 0}.get(task)


def _check_args(task: str, backend: str, shots: int | None, limit: int | None, batch_size: int,
                data: str | None, recipe: str | None) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
    if backend == "rlora" and task not in TASKS:
        raise UserError(f"unknown task {task!r}", f"use --task {'|'.join(TASKS)}, or --backend lm-eval "
                        "--task NAME for an lm-evaluation-harness task")
    for name, value, low in (("--shots", shots, 0), ("--limit", limit, 1), ("--batch-size", batch_size, 1)):
        if value is not None and value < low:
            raise UserError(f"{name} must be at least {low} (got {value})", f"give {name} {low} or more")
    if backend == "rlora" and task == "bbh" and not data:
        raise UserError("--task bbh needs --data",
                        "give a BIG-bench task.json, a BBH .json, or a folder of them")
    if backend == "rlora" and task == "recipe" and not recipe:
        raise UserError("--task recipe needs --recipe",
                        "give the recipe YAML, or --adapter RUN/adapter of a run that holds recipe.yaml")


def _prepare(task: str, data: str | None, shots: int | None, limit: int | None,
             subjects: list[str] | None, recipe: str | None, adapter: str | None = None) -> dict[str, Any]:
    """Load and check the task's data before any model is loaded (recipe tasks render in the
    templates saved with `adapter`, when one is given)."""
    n_shots = default_shots(task, shots) or 0
    if task == "mmlu":
        return {"mmlu": load_mmlu(data, subjects, n_shots), "shots": n_shots, "limit": limit}
    if task == "bbh":
        files = bigbench_files(data)  # type: ignore[arg-type]
        tasks = {name: load_bigbench(path) for name, path in files.items()}
        for name, t in tasks.items():
            if len(t["examples"]) <= n_shots:
                raise UserError(f"--shots {n_shots} leaves no example of task {name} to score "
                                f"({len(t['examples'])} examples)", "lower --shots")
        return {"bbh": tasks, "shots": n_shots, "limit": limit}
    return prepare_recipe(recipe, limit, adapter)  # type: ignore[arg-type]


def _run(task: str, prepared: dict[str, Any], model: Any, tokenizer: Any, batch_size: int,
         console: Any) -> dict[str, dict[str, Any]]:
    if task == "mmlu":
        return run_mmlu(model, tokenizer, prepared["mmlu"], shots=prepared["shots"],
                        limit=prepared["limit"], batch_size=batch_size, console=console)
    if task == "bbh":
        return run_bigbench(model, tokenizer, prepared["bbh"], shots=prepared["shots"],
                            limit=prepared["limit"], batch_size=batch_size, console=console)
    return run_recipe(model, tokenizer, prepared, batch_size=batch_size, console=console)


# -------------------------------------------------------------------------------- the tasks


def run_mmlu(model: Any, tokenizer: Any, subjects: dict[str, tuple[list, list]], *, shots: int = 5,
             limit: int | None = None, batch_size: int = 8, console: Any = None) -> dict[str, dict]:
    """{subject: {accuracy, n}}: the letter among " A".." D" with the highest log-likelihood."""
    requests, gold = [], []
    for subject, (dev, test) in subjects.items():
        for question in test[:limit]:
            requests.append((mmlu_prompt(subject, question, dev[:shots]), [f" {c}" for c in LETTERS]))
            gold.append((subject, question["answer"]))
    with progress(console, len(requests), "MMLU") as advance:
        scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=advance)
    correct: dict[str, list[bool]] = {s: [] for s in subjects}
    for (subject, answer), cand in zip(gold, scores):
        correct[subject].append(_argmax([s.logprob for s in cand]) == answer)
    return {s: task_record(c) for s, c in correct.items()}


def run_bigbench(model: Any, tokenizer: Any, tasks: dict[str, dict], *, shots: int = 0,
                 limit: int | None = None, batch_size: int = 8, console: Any = None) -> dict[str, dict]:
    """{task: {accuracy, n, multiple_choice, exact_match}} for BIG-bench/BBH task files."""
    mc, gen = [], []  # (task, example, prompt)
    for name, task in tasks.items():
        examples = task["examples"]
        for ex in examples[shots:][:limit]:
            prompt = bigbench_prompt(task, ex, examples[:shots])
            (mc if bigbench_choices(ex) else gen).append((name, ex, prompt))
    correct: dict[str, list[bool]] = {name: [] for name in tasks}
    with progress(console, len(mc) + len(gen), "BIG-bench") as advance:
        scores = loglikelihoods(model, tokenizer, [(p, bigbench_choices(ex)) for _, ex, p in mc],
                                batch_size=batch_size, progress=advance)
        texts = decode(model, tokenizer, [p for _, _, p in gen], until_newline=True, batch_size=batch_size,
                       progress=advance)
    for (name, ex, _), cand in zip(mc, scores):
        target_scores = list(ex["target_scores"].values())
        correct[name].append(target_scores[_argmax([s.logprob for s in cand])] == max(target_scores))
    for (name, ex, _), text in zip(gen, texts):
        correct[name].append(text.strip() in {t.strip() for t in bigbench_targets(ex)})
    n_mc = {name: sum(1 for t, _, _ in mc if t == name) for name in tasks}
    return {name: task_record(c, multiple_choice=n_mc[name], exact_match=len(c) - n_mc[name])
            for name, c in correct.items()}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first
