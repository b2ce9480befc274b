"""The paired bootstrap behind the benchmark's "A − B" rows: is one variant better than another
beyond the noise of which examples happened to be held out?

    from benchmarks.mtl.stats import paired_bootstrap
    paired_bootstrap(a, b)   # a, b: {seed: {task: {"correct": [1, 0, ...], "example_keys": [...]}}}

`a` and `b` hold, per seed and task, the 0/1 result of each held-out example, in the split's
order (`rlora_cli.eval.recipe_tasks.run_recipe` writes them), and the examples' keys: A and B must
have been scored on the same examples, seed by seed, or nothing is computed.

Each replicate draws, within every seed and every task, that task's examples with replacement
(the same indices for A and B, so the comparison stays paired), computes the table's average
(the mean over tasks of each task's accuracy) for A and for B, and takes the mean over seeds of
A − B. The seeds bring what one split cannot (the split itself, the initialisation, the data
order); the draws add the sampling noise of the examples inside each split. The 95% interval is
the 2.5th and 97.5th percentile of the replicates (linear interpolation between order statistics,
numpy's default); `resolved` says it excludes 0. The same replicates give each task's own
difference (mean over seeds) and its interval. One torch.Generator seeded with `seed` draws the
indices, seeds in ascending order and, within a seed, tasks in A's order, so a rerun gives the
same intervals.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from rlora_cli.errors import UserError

REPLICATES = 2000
LEVEL = 0.95

Side = dict[int, dict[str, dict[str, Any]]]  # {seed: {task: {"correct": [...], "example_keys": [...]}}}


def paired_bootstrap(a: Side, b: Side, *, replicates: int = REPLICATES, seed: int = 0,
                     level: float = LEVEL) -> dict[str, Any]:
    """{diff, ci, resolved, seeds, replicates, tasks: {task: {diff, ci, resolved}}} of A − B over
    the seeds both sides have; `diff` is the observed difference of the averages."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise UserError("the two sides of a comparison share no seed", "compare runs of the same seeds")
    diffs = {s: paired_differences(a[s], b[s], s) for s in seeds}
    tasks = list(diffs[seeds[0]])
    if any(list(diffs[s]) != tasks for s in seeds) or not tasks:
        raise UserError(f"the seeds of a comparison hold different tasks ({', '.join(tasks) or 'none'} "
                        f"at seed {seeds[0]})", "compare runs of one benchmark (same tasks at every seed)")
    g = torch.Generator().manual_seed(seed)
    per_task = torch.zeros(len(tasks), replicates, dtype=torch.float64)
    observed = torch.zeros(len(tasks), dtype=torch.float64)
    for s in seeds:
        for j, task in enumerate(tasks):
            d = diffs[s][task]
            idx = torch.randint(len(d), (replicates, len(d)), generator=g)
            per_task[j] += d[idx].mean(dim=1)
            observed[j] += d.mean()
    per_task /= len(seeds)
    observed /= len(seeds)
    by_task = {t: {"diff": observed[j].item(), **interval(per_task[j], level)} for j, t in enumerate(tasks)}
    return {"diff": observed.mean().item(), **interval(per_task.mean(dim=0), level), "seeds": seeds,
            "replicates": replicates, "tasks": by_task}


def paired_differences(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]],
                       seed: int) -> dict[str, torch.Tensor]:
    """{task: A − B per example (float64)} for the tasks with an accuracy on either side; refuses
    a task that only one side has or whose examples differ."""
    out = {}
    for task in [*a, *(t for t in b if t not in a)]:
        ra, rb = a.get(task, {}), b.get(task, {})
        if ra.get("correct") is None and rb.get("correct") is None:
            continue  # a loss-only task: no accuracy to compare
        if ra.get("correct") is None or rb.get("correct") is None:
            raise UserError(f"seed {seed}, task {task}: only one side of the comparison has results",
                            "compare runs of one benchmark (the same tasks)")
        if ra.get("example_keys") != rb.get("example_keys") or len(ra["correct"]) != len(rb["correct"]):
            raise UserError(f"seed {seed}, task {task}: the two sides were scored on different examples",
                            "compare runs of the same held-out split (same seed and data settings)")
        if ra["correct"]:
            out[task] = (torch.tensor(ra["correct"], dtype=torch.float64)
                         - torch.tensor(rb["correct"], dtype=torch.float64))
    return out


def interval(replicates: torch.Tensor, level: float = LEVEL) -> dict[str, Any]:
    """{ci: [low, high], resolved}: the percentile interval of the replicates; resolved = 0 is outside."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(replicates.to(torch.float64), q).tolist()
    return {"ci": [low, high], "resolved": low > 0 or high < 0}


def spread(values: list[float | None]) -> dict[str, Any]:
    """{mean, std, values} over the values given (None = missing): the sample std, None for one."""
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}
