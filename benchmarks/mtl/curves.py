"""The learning curves' results, read from the budget files of a benchmark folder: per budget the
accuracy table, the paired bootstrap comparisons and the ordering of the variants; across budgets
where that ordering changes; the routers' use of their heads per task; the router entropy logged
during training; MultiLoRA's gate magnitudes. Data only: report_curves.py renders it.

    python -m benchmarks.mtl.report OUT_OR_RAW [--out DIR]     # what reads this

A folder is an OUT of `python -m benchmarks.mtl --budgets ...` (`runs/<variant>-seed<s>/`) or its
committed copy (`by_run/<variant>-seed<s>/`), each holding budget-<N>.json files (budgets.py),
with `base/seed<s>.json` and `settings.json` beside.
"""

from __future__ import annotations

import json
import math
import re
from itertools import pairwise
from pathlib import Path
from typing import Any

from rlora_cli.report.analyze import gate_stats
from rlora_cli.runs import read_metrics

from .plan import VARIANTS
from .stats import REPLICATES, paired_bootstrap, spread

RESULT_FOLDERS = ("runs", "by_run")  # an OUT folder; its committed copy (git ignores runs/)
FOLDED = " (folded)"
FOLDED_ROW = "the same adapters, the router fixed to each task's fold (one static LoRA per task)"
# A − B, each where both sides were scored on at least one common seed.
COMPARISONS = (
    ("rlora", "hydralora"), ("rlora", "lora"), ("rlora", "lora-matched"), ("lora-matched", "lora"),
    ("rlora", "rlora-router-off"), ("multilora", "lora"), ("multilora", "multilora-gate1"),
    ("multilora-gate1", "lora"),
    ("rlora (folded)", "rlora"), ("rlora (folded)", "rlora-router-off"), ("hydralora (folded)", "hydralora"),
    ("rlora-router-lr", "rlora"), ("rlora-mi", "rlora"), ("rlora-router-lr-mi", "rlora-router-lr"))
_BUDGET = re.compile(r"^budget-(\d+)\.json$")


def budget_files(folder: Path) -> list[Path]:
    """Every <results folder>/<variant>-seed<s>/budget-<N>.json under `folder`."""
    return sorted(p for name in RESULT_FOLDERS for p in (folder / name).glob("*/budget-*.json")
                  if _BUDGET.match(p.name))


def build(folder: str | Path, replicates: int = REPLICATES) -> dict[str, Any]:
    """results.json of the learning curves in `folder`."""
    folder = Path(folder)
    settings = _read(folder / "settings.json") or {}
    records = [_read(p) for p in budget_files(folder)]
    tasks = list(settings.get("tasks") or records[0]["tasks"])
    variants = sorted({r["method"] for r in records}, key=_variant_order)
    budgets = sorted({r["budget"] for r in records})
    by_budget = {}
    for n in budgets:
        mine = [r for r in records if r["budget"] == n]
        by_budget[str(n)] = budget_summary(mine, tasks, variants, settings, replicates)
        by_budget[str(n)]["base"] = base_summary(folder / "base", tasks, by_budget[str(n)]["row_seeds"])
    return {
        "settings": settings, "budgets": budgets, "variants": variants,
        "tasks": {t: {"held_out": _held_out(t, records)} for t in tasks},
        "seeds": sorted({r["seed"] for r in records}),
        "by_budget": by_budget,
        "ordering_changes": ordering_changes({n: by_budget[str(n)]["ordering"] for n in budgets}),
        "router_usage": router_usage(records, variants, budgets),
        "router_entropy": router_entropy(folder, variants),
        "gates": gates(records, variants, budgets),
    }


def base_summary(folder: Path, tasks: list[str], seeds: list[int]) -> dict[str, Any]:
    """The base model's row over `seeds`: base/seed<s>.json (the `rlora eval` results shape)."""
    files = [folder / f"seed{s}.json" for s in seeds if (folder / f"seed{s}.json").is_file()]
    base = [_read(p) for p in files]
    return {"tasks": {t: spread([b["tasks"][t]["accuracy"] for b in base if t in b["tasks"]]) for t in tasks},
            "average": spread([b["mean_accuracy"] for b in base]),
            "seeds": [int(p.stem.removeprefix("seed")) for p in files]}


def budget_summary(records: list[dict[str, Any]], tasks: list[str], variants: list[str],
                   settings: dict[str, Any], replicates: int) -> dict[str, Any]:
    """One budget: a row per variant (and per folded variant), the comparisons, the ordering.

    The rows and the ordering take only the seeds that every variant at this budget has
    (`row_seeds`): a seed is a split, so means over different seeds would compare different
    held-out sets. The paired comparisons take every seed that both of their sides have."""
    seeds_of: dict[str, set[int]] = {}
    for r in records:
        seeds_of.setdefault(r["method"], set()).add(r["seed"])
    shared = set.intersection(*seeds_of.values())
    rows: dict[str, Any] = {}
    for m in variants:
        mine = sorted((r for r in records if r["method"] == m and r["seed"] in shared),
                      key=lambda r: r["seed"])
        if not mine:
            continue
        rows[m] = {**row(mine, tasks, description(m, settings)), "train_loss": _train_loss(mine)}
        folded = [{**r, **r["folded"]} for r in mine if "folded" in r]
        if folded:
            rows[m + FOLDED] = {**row(folded, tasks, FOLDED_ROW), "train_loss": _train_loss(folded)}
    comparisons = []
    for a, b in COMPARISONS:
        sa, sb = side(records, a), side(records, b)
        if set(sa) & set(sb):
            comparisons.append({"a": a, "b": b, **paired_bootstrap(sa, sb, replicates=replicates)})
    ranked = [m for m in variants if m in rows and rows[m]["average"]["mean"] is not None]
    return {"methods": rows, "comparisons": comparisons, "row_seeds": sorted(shared),
            "ordering": sorted(ranked, key=lambda m: -rows[m]["average"]["mean"])}


def row(records: list[dict[str, Any]], tasks: list[str], description: str,
        trainable: int | None = None) -> dict[str, Any]:
    """A method's row over its seeds' records: accuracy per task and on average (mean ± std).
    `trainable` stands in for the records' count when there are none yet."""
    return {"description": description,
            "trainable_parameters": records[0]["trainable_parameters"] if records else trainable,
            "seeds": [r["seed"] for r in records],
            "tasks": {t: spread([r["tasks"].get(t, {}).get("accuracy") for r in records]) for t in tasks},
            "average": spread([r["mean_accuracy"] for r in records])}


def _train_loss(records: list[dict[str, Any]]) -> dict[str, Any]:
    return spread([(r.get("train_loss") or {}).get("loss") for r in records])


def side(records: list[dict[str, Any]], name: str) -> dict[int, dict[str, Any]]:
    """{seed: {task: record}} of one side of a comparison: a variant, or "<variant> (folded)"."""
    method = name.removesuffix(FOLDED)
    folded = name != method
    return {r["seed"]: (r["folded"] if folded else r)["tasks"] for r in records
            if r["method"] == method and (not folded or "folded" in r)}


def ordering_changes(orderings: dict[int, list[str]]) -> list[dict[str, Any]]:
    """Each pair of consecutive budgets whose orderings (of the variants both have) differ."""
    changes = []
    for (b1, o1), (b2, o2) in pairwise(orderings.items()):
        before = [m for m in o1 if m in o2]
        after = [m for m in o2 if m in o1]
        if before != after:
            changes.append({"from": b1, "to": b2, "before": before, "after": after})
    return changes


def router_usage(records: list[dict[str, Any]], variants: list[str], budgets: list[int]) -> dict[str, Any]:
    """{variant: {budget: ...}} for the folded variants: the folds' entropy and the per-module
    entropy (mean over tasks, then over seeds), and the largest per-module L1 distance between
    two tasks' mixtures (each pair's mean over seeds, the largest pair named)."""
    out: dict[str, Any] = {}
    for m in variants:
        for n in budgets:
            mine = [r["folded"] for r in records if r["method"] == m and r["budget"] == n and "folded" in r]
            if mine:
                out.setdefault(m, {})[str(n)] = _usage(mine)
    return out


def _usage(folded: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    heads = len(next(iter(folded[0]["folds"].values()))["mixture"])
    pairs: dict[tuple[str, ...], list[float]] = {}
    for f in folded:
        for p in f.get("usage", {}).get("pairwise_l1", []):
            pairs.setdefault(tuple(p["tasks"]), []).append(p["l1"])
    widest = max(pairs, key=lambda k: mean(pairs[k]), default=None)
    module = [mean(list(f["usage"]["module_entropy"].values())) for f in folded if "usage" in f]
    return {"heads": heads, "uniform_entropy": math.log(heads), "seeds": len(folded),
            "fold_entropy": mean([mean([v["entropy"] for v in f["folds"].values()]) for f in folded]),
            "module_entropy": mean(module) if module else None,
            "max_l1": mean(pairs[widest]) if widest else None,
            "max_l1_tasks": list(widest) if widest else None}


def gates(records: list[dict[str, Any]], variants: list[str], budgets: list[int]) -> dict[str, Any]:
    """{variant: {budget: {"mean_abs": per head, the mean over seeds of the modules' mean |g_i|,
    "max_abs": the largest |g_i| of any module and seed, "seeds"}}} for the scalar-gate variants
    whose budget files record their gates (budgets.gate_summary)."""
    out: dict[str, Any] = {}
    for m in variants:
        for n in budgets:
            mine = [r["gates"] for r in records if r["method"] == m and r["budget"] == n and "gates" in r]
            if mine:
                out.setdefault(m, {})[str(n)] = {
                    "mean_abs": gate_stats([g["mean_abs"] for g in mine])["mean_abs"],
                    "max_abs": max(g["max_abs"] for g in mine), "seeds": len(mine)}
    return out


def router_entropy(folder: Path, variants: list[str]) -> dict[str, Any]:
    """{variant: {steps, entropy}}: `router_entropy` of the runs' training logs, mean over the seeds
    that logged each step; {} when no log has it."""
    out: dict[str, Any] = {}
    for m in variants:
        by_step: dict[int, list[float]] = {}
        for log in (p for name in RESULT_FOLDERS for p in (folder / name).glob(f"{m}-seed*/metrics.jsonl")):
            for row in read_metrics(log):
                if isinstance(row.get("router_entropy"), (int, float)) and "step" in row:
                    by_step.setdefault(row["step"], []).append(float(row["router_entropy"]))
        if by_step:
            steps = sorted(by_step)
            out[m] = {"steps": steps, "entropy": [sum(by_step[s]) / len(by_step[s]) for s in steps]}
    return out


def _held_out(task: str, records: list[dict[str, Any]]) -> int | None:
    return next((r["tasks"][task]["n"] for r in records if task in r["tasks"]), None)


def description(method: str, settings: dict[str, Any]) -> str:
    """The variant's description; lora-matched's with its rank."""
    text = VARIANTS[method][1] if method in VARIANTS else method
    r = settings.get("lora_matched_r")
    return text + (f" (r = {r})" if method == "lora-matched" and r else "")


def _variant_order(method: str) -> tuple[int, str]:
    order = list(VARIANTS)
    return (order.index(method) if method in order else len(order), method)


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None
