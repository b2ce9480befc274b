"""The benchmark loop: per seed, score the base model on each task's held-out examples; per
(variant, seed), train with `rlora_cli.training.loop.train` and score the adapter the same way
(`rlora_cli.eval.recipe_tasks.run_recipe`: highest log-likelihood choice for multiple choice, greedy
exact match for free-form). Finished runs are kept: run it again to continue after a crash.

    OUT/settings.json                  what was run
    OUT/recipes/<variant>-seed<s>.yaml one recipe per run (train any of them alone with rlora train)
    OUT/base/seed<s>.json              the base model on seed s's held-out split (results shape)
    OUT/analysis/<variant>.json        rlora analyze of the first seed's (last) adapter
    OUT/results.json, OUT/results.md   per task and average: mean ± std over seeds, parameters, time
    OUT/plots/*.png                    accuracy per method, head similarity, ΔW spectra

One budget (no --budgets):
    OUT/runs/<variant>-seed<s>/        the run directory; + result.json and eval.json (results shape);
                                       --fold: result.json's "folded" and folded.json (results shape)
Learning curves (--budgets 150,300,...; budgets.py says how each budget is trained as a segment,
scored at once, and how a killed run continues; the budgets may grow from call to call):
    OUT/train/<variant>-seed<s>/       the run directory, a checkpoint at every budget
    OUT/runs/<variant>-seed<s>/        budget-<N>.json per budget, metrics.jsonl, run_info.json
    + results.md's paired bootstrap comparisons, router usage and MultiLoRA's gates per budget,
      plots/curves.png and,
    when the training logs hold router_entropy, plots/router_entropy.png

`--shard i/k` takes every k-th (variant, seed) from the i-th and writes no report, so k processes
can share one GPU and one OUT; `--collect` trains nothing and writes the report of the result
files OUT holds (`collect`; `python -m benchmarks.mtl.report` does the same for a copied folder).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from rlora_cli.analyze import analyze_adapter
from rlora_cli.errors import UserError

from . import budgets, plan, report


def run_benchmark(tasks_dir: str | Path | None, settings: plan.Settings, out: str | Path, *,
                  smoke: bool = False, methods_given: bool = True, overwrite: bool = False,
                  fold: bool = False, shard: tuple[int, int] | None = None,
                  console: Any = None) -> dict[str, Any]:
    """Run every (variant, seed) and write the results; returns the results.json object. `fold`:
    router variants are also scored per task with the router fixed to the task's fold (with
    budgets, always). `shard` (i, k): only every k-th run from the i-th, and no report; returns
    {"shard", "runs"} then."""
    from rich.console import Console

    from . import smoke as smoke_mod

    console = console or Console()
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if smoke:
        settings = smoke_mod.smoke_settings(settings, str(smoke_mod.tiny_model(out)), methods_given)
        if tasks_dir is None:
            tasks_dir = smoke_mod.write_tasks(out / "tasks")
    if tasks_dir is None:
        raise UserError("--tasks-dir is required (except with --smoke)",
                        "give a folder of BIG-bench task folders, e.g. data/bigbench (make bigbench-data)")
    plan.check_methods(settings.methods)
    tasks = plan.find_tasks(tasks_dir, settings.tasks)
    if smoke:
        tasks = dict(list(tasks.items())[:2])
    matched_r = plan.matched_lora_rank(settings.model, settings)
    counts = plan.trainable_counts(settings.model, settings, settings.methods, matched_r)
    _claim(out / "settings.json",
           {**settings.to_dict(), "tasks_dir": str(tasks_dir), "smoke": smoke,
            "tasks": {n: {"path": str(p), "examples": k} for n, (p, k) in tasks.items()},
            "lora_matched_r": matched_r, "planned_trainable": counts})
    console.print(f"[bold]multi-task benchmark[/]: {len(tasks)} tasks, "
                  f"methods {', '.join(settings.methods)}, seeds {', '.join(map(str, settings.seeds))}; "
                  f"lora-matched r = {matched_r}", highlight=False)

    recipes = {(m, s): plan.write_recipe(out / "recipes" / f"{m}-seed{s}.yaml",
                                         plan.recipe(m, s, settings, tasks, matched_r))
               for s in settings.seeds for m in settings.methods}
    mine = plan.pairs(settings, shard)
    base = {s: score_base(recipes[(settings.methods[0], s)], settings, out / "base" / f"seed{s}.json",
                          console)
            for s in dict.fromkeys(s for _, s in mine)}
    if settings.budgets:
        budgets.run_curves(mine, recipes, out, settings, console)
        return _shard_done(shard, mine, console) if shard else collect(out, console)
    runs = [train_and_score(m, s, recipes[(m, s)], out / "runs" / f"{m}-seed{s}", settings, console)
            for m, s in mine]
    if fold:
        runs = [score_folded(run, recipes[(run["method"], run["seed"])], settings, console)
                if plan.routed(run["method"]) else run for run in runs]
    if shard:
        return _shard_done(shard, mine, console)
    analyses = analyze_first_seed(runs, out / "analysis", console)
    results = report.summarize(settings, tasks, base, runs, counts, matched_r)
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(report.markdown(results))
    report.plots(results, analyses, out / "plots")
    console.print(report.markdown(results), markup=False, highlight=False)
    console.print(f"[green]done[/]: {out / 'results.md'}, {out / 'results.json'}, plots in {out / 'plots'}")
    return results


def collect(out: str | Path, console: Any = None) -> dict[str, Any]:
    """--collect: the report of whatever result files OUT holds (results.json, results.md,
    plots/); the learning curves' runs (OUT/train/) first get each variant's first-seed adapter
    analysed again (a single-budget OUT keeps the analysis/ its runs wrote). Returns results.json."""
    from rich.console import Console

    console = console or Console()
    out = Path(out)
    firsts: dict[str, Path] = {}
    for adapter in sorted((out / "train").glob("*-seed*/adapter"), key=lambda p: _seed_of(p.parent.name)):
        firsts.setdefault(adapter.parent.name.rsplit("-seed", 1)[0], adapter)
    for method, adapter in firsts.items():  # the adapter/ of the largest budget trained so far
        _write_json(out / "analysis" / f"{method}.json", analyze_adapter(adapter))
    results, text = report.rebuild(out)
    console.print(text, markup=False, highlight=False)
    console.print(f"[green]done[/]: {out / 'results.md'}, {out / 'results.json'}, plots in {out / 'plots'}")
    return results


def _seed_of(name: str) -> int:
    tail = name.rsplit("-seed", 1)[-1]
    return int(tail) if tail.lstrip("-").isdigit() else 0


def _shard_done(shard: tuple[int, int], mine: list[tuple[str, int]], console: Any) -> dict[str, Any]:
    names = [f"{m}-seed{s}" for m, s in mine]
    console.print(f"[green]shard {shard[0]}/{shard[1]} done[/]: {', '.join(names) or 'nothing to run'}; "
                  "--collect writes the report", highlight=False)
    return {"shard": list(shard), "runs": names}


def _claim(path: Path, wanted: dict[str, Any]) -> None:
    """Write settings.json, or check that OUT's finished runs were made with these settings
    (methods and seeds may grow: new ones are added to the same benchmark; so may the budgets,
    every one OUT has given again)."""
    if path.is_file():
        had = _older(json.loads(path.read_text()), wanted)
        differ = sorted(k for k in set(had) | set(wanted)
                        if k not in ("methods", "seeds", "planned_trainable", "budgets")
                        and had.get(k) != wanted.get(k))
        if differ:
            raise UserError(f"{path.parent} holds a benchmark run with other settings ({', '.join(differ)})",
                            "give another --out, or --overwrite to delete it and start over")
        old, new = had["budgets"], wanted["budgets"]
        if not set(old) <= set(new) or bool(old) != bool(new):  # one budget and curves never mix
            show = lambda b: ",".join(map(str, b)) or "none"  # noqa: E731
            raise UserError(f"{path.parent} holds the budgets {show(old)}, and --budgets gives {show(new)}",
                            "give every budget OUT has (more may be added), or another --out")
    _write_json(path, wanted)


def _older(had: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """A settings.json written before a setting existed, with the value its runs had: no budgets;
    learning curves warmed up for warmup_ratio of the largest budget (ceil, as the trainer did)."""
    had = {"budgets": [], **had}
    if "warmup_steps" not in had:
        had["warmup_steps"] = (math.ceil(had.get("warmup_ratio", 0.0) * max(had["budgets"]))
                               if had["budgets"] else wanted.get("warmup_steps"))
    return had


def score_base(recipe_path: Path, settings: plan.Settings, path: Path, console: Any) -> dict[str, Any]:
    """The base model's held-out accuracy per task for one seed's split (cached in `path`)."""
    if path.is_file():
        return json.loads(path.read_text())
    from rlora_cli.model import load_with_adapter

    start = time.perf_counter()
    lm, tokenizer, _ = load_with_adapter(settings.model, None, dtype=settings.dtype)
    tasks = _score(lm, tokenizer, recipe_path, settings, console)
    return _results_file(path, settings.model, None, time.perf_counter() - start, tasks)


def train_and_score(method: str, seed: int, recipe_path: Path, run_dir: Path, settings: plan.Settings,
                    console: Any) -> dict[str, Any]:
    """Train one variant for one seed, score its adapter; returns (and caches) its result."""
    result_path = run_dir / "result.json"
    if result_path.is_file():
        console.print(f"[dim]{run_dir.name}: done before, kept[/]")
        return json.loads(result_path.read_text())
    from rlora_cli.model import load_with_adapter
    from rlora_cli.training.loop import train

    console.rule(f"{method}, seed {seed}")
    start = time.perf_counter()
    train(recipe_path, output=run_dir, overwrite=True, console=console)  # overwrite: a crashed attempt
    train_s = time.perf_counter() - start
    lm, tokenizer, _ = load_with_adapter(None, str(run_dir / "adapter"), dtype=settings.dtype)
    tasks = _score(lm, tokenizer, recipe_path, settings, console)
    eval_s = time.perf_counter() - start - train_s
    _results_file(run_dir / "eval.json", settings.model, str(run_dir / "adapter"), eval_s, tasks)
    info = json.loads((run_dir / "run_info.json").read_text())
    result = {"method": method, "seed": seed, "run_dir": str(run_dir),
              "trainable_parameters": info["trainable_parameters"], "train_s": round(train_s, 2),
              "eval_s": round(eval_s, 2), "wall_s": round(train_s + eval_s, 2),
              "tasks": {t: {"accuracy": r["accuracy"], "n": r["n"]} for t, r in tasks.items()},
              "mean_accuracy": budgets.mean_accuracy(tasks)}
    _write_json(result_path, result)
    return result


def score_folded(run: dict[str, Any], recipe_path: Path, settings: plan.Settings,
                 console: Any) -> dict[str, Any]:
    """A router variant's run, scored again per task with the router fixed to the task's fold
    (its held-out rows' mean mixture); adds run["folded"] and caches it in result.json."""
    if "folded" in run:
        return run
    from rlora_cli.checkpoint import read_adapter_config
    from rlora_cli.eval.recipe_tasks import prepare_recipe
    from rlora_cli.eval.run import score_folds
    from rlora_cli.fold import plan_folds
    from rlora_cli.model import load_with_adapter

    start = time.perf_counter()
    adapter = Path(run["run_dir"]) / "adapter"
    folds = plan_folds(adapter, read_adapter_config(adapter), None, recipe=recipe_path)
    lm, tokenizer, _ = load_with_adapter(None, str(adapter), dtype=settings.dtype)
    tasks, infos = score_folds(folds, prepare_recipe(str(recipe_path), None), lm, tokenizer,
                               settings.eval_batch_size, console)
    _results_file(Path(run["run_dir"]) / "folded.json", settings.model, str(adapter),
                  time.perf_counter() - start, tasks)
    run = {**run, "folded": {"tasks": {t: {"accuracy": r["accuracy"], "n": r["n"]} for t, r in tasks.items()},
                             "mean_accuracy": budgets.mean_accuracy(tasks),
                             "folds": infos}}
    _write_json(Path(run["run_dir"]) / "result.json", run)
    return run


def _score(lm: Any, tokenizer: Any, recipe_path: Path, settings: plan.Settings,
           console: Any) -> dict[str, Any]:
    from rlora_cli.eval.recipe_tasks import prepare_recipe, run_recipe

    return run_recipe(lm, tokenizer, prepare_recipe(str(recipe_path), None),
                      batch_size=settings.eval_batch_size, console=console)


def _results_file(path: Path, model: str, adapter: str | None, wall_s: float,
                  tasks: dict[str, Any]) -> dict[str, Any]:
    """The `rlora eval` results shape, so `rlora eval compare` reads these files too."""
    from rlora_cli.eval.results import results_dict

    results = results_dict("recipe", model, adapter, None, None, wall_s, tasks)
    _write_json(path, results)
    return results


def analyze_first_seed(runs: list[dict[str, Any]], folder: Path, console: Any) -> dict[str, dict[str, Any]]:
    """rlora analyze of each variant's first-seed adapter (head similarity and spectra)."""
    analyses: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run["method"] not in analyses:
            analyses[run["method"]] = analyze_adapter(Path(run["run_dir"]) / "adapter")
            _write_json(folder / f"{run['method']}.json", analyses[run["method"]])
    return analyses



def _write_json(path: Path, data: Any) -> None:
    from rlora_cli.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
