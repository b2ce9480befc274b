"""The results file every `rlora eval` writes, and `rlora eval compare` of two of them.

    rlora eval compare base.json tuned.json --plot delta.png

A results file is one JSON object (`results_dict`): a header (task, model, adapter, shots, limit,
rlora version, wall time), the overall accuracy over every scored example, the mean of the
per-task accuracies, then `tasks: {name: {accuracy, n, ...}}` with loss, perplexity or F1 where a
task has them. `comparison` is the per-task B − A of two files, on each task's own metric;
`compare` is the command: it renders that through `report/eval.py`. With `--compare-routed` a
results file also holds `routed_vs_folded` (`routed_vs_folded`): per task the routed and the
folded metric, folded − routed, and the fold (its rows, tokens, mixture and entropy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlora_cli import __version__
from rlora_cli.errors import UserError
from rlora_cli.files import check_output_file
from rlora_cli.report.eval import plot_comparison, print_comparison, print_written

RESULTS_FIX = "give a file written by rlora eval --output"
# Metrics in the order a task's compare metric is chosen: the first one either file has.
METRICS = ("accuracy", "f1", "loss", "perplexity")


def results_dict(task: str, model: str | None, adapter: str | None, shots: int | None,
                 limit: int | None, wall_s: float, tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results-file object: header, overall and mean accuracy, then per task."""
    scored = {k: v for k, v in tasks.items() if v.get("accuracy") is not None and v.get("n")}
    n = sum(v["n"] for v in scored.values())
    return {
        "task": task, "model": model, "adapter": adapter, "shots": shots, "limit": limit,
        "rlora_version": __version__, "wall_s": round(wall_s, 3),
        "accuracy": sum(v["accuracy"] * v["n"] for v in scored.values()) / n if n else None,
        "n": n,
        "mean_accuracy": sum(v["accuracy"] for v in scored.values()) / len(scored) if scored else None,
        "tasks": tasks,
    }


def routed_vs_folded(routed: dict[str, dict[str, Any]], folded: dict[str, dict[str, Any]],
                     folds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{tasks: {name: {metric, routed, folded, delta = folded − routed, fold}}, mean_accuracy}: each
    task on its own metric, the router either routing per token or fixed to the task's fold."""
    tasks = {}
    for name, fold in folds.items():
        r, f = routed.get(name, {}), folded.get(name, {})
        metric = next((m for m in METRICS if _num(r.get(m)) is not None), "accuracy")
        d = delta(r.get(metric), f.get(metric))
        tasks[name] = {"metric": metric, "n": f.get("n"), "routed": d["a"], "folded": d["b"],
                       "delta": d["delta"], "fold": fold}
    scored = [v for v in tasks.values() if v["metric"] == "accuracy" and v["delta"] is not None]
    means = [sum(v[k] for v in scored) / len(scored) if scored else None for k in ("routed", "folded")]
    mean = delta(*means)  # over the accuracy-scored tasks
    return {"tasks": tasks,
            "mean_accuracy": {"routed": mean["a"], "folded": mean["b"], "delta": mean["delta"]}}


def load_results(path: str | Path) -> dict[str, Any]:
    """A results file, checked for the shape `compare` needs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such results file", RESULTS_FIX)
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})", RESULTS_FIX) from None
    tasks = results.get("tasks") if isinstance(results, dict) else None
    bad = not isinstance(tasks, dict) or not all(isinstance(v, dict) and "accuracy" in v
                                                 for v in tasks.values())
    if bad or "accuracy" not in results:
        raise UserError(f"{path}: not an rlora results file (needs `accuracy` and `tasks`: "
                        "{name: {accuracy, n, ...}})", RESULTS_FIX)
    return results


# ----------------------------------------------------------------------------------- compare


def compare(a_path: str | Path, b_path: str | Path, plot: str | Path | None = None,
            console: Any = None) -> dict[str, Any]:
    """`rlora eval compare`: per-task deltas (B − A) of two results files, as a table on `console`
    (nothing printed without one) and, with `plot`, a PNG bar chart."""
    if plot:
        check_output_file(plot, "--plot")
    a, b = load_results(a_path), load_results(b_path)
    out = comparison(a, b, str(a_path), str(b_path))
    print_comparison(out, console)
    if plot:
        plot_comparison(out, plot, _label(a, "A"), _label(b, "B"))
        print_written("plot", plot, console)
    return out


def comparison(a: dict[str, Any], b: dict[str, Any], a_name: str = "A", b_name: str = "B") -> dict[str, Any]:
    """{a, b, tasks: {name: {metric, a, b, delta}}, accuracy, mean_accuracy}: every task of
    both files (A's order, then B's new ones), each on the first metric either file has."""
    tasks = {}
    for name in [*a["tasks"], *(t for t in b["tasks"] if t not in a["tasks"])]:
        ra, rb = a["tasks"].get(name, {}), b["tasks"].get(name, {})
        metric = next((m for m in METRICS if _num(ra.get(m)) is not None or _num(rb.get(m)) is not None),
                      "accuracy")
        tasks[name] = {"metric": metric, **delta(ra.get(metric), rb.get(metric))}
    return {"a": a_name, "b": b_name, "tasks": tasks,
            "accuracy": delta(a["accuracy"], b["accuracy"]),
            "mean_accuracy": delta(a.get("mean_accuracy"), b.get("mean_accuracy"))}


def delta(a: Any, b: Any) -> dict[str, float | None]:
    """{a, b, delta = b − a}; a value that is not a number is None, and so is the delta then."""
    a, b = _num(a), _num(b)
    return {"a": a, "b": b, "delta": b - a if a is not None and b is not None else None}


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _label(results: dict[str, Any], default: str) -> str:
    name = results.get("adapter") or results.get("model")
    return f"{default}: {name}" if name else default
