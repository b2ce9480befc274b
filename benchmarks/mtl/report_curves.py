"""The learning curves rendered: results.md (per budget the accuracy table, the paired bootstrap
comparisons and the ordering; where the ordering changes; the routers' use of their heads;
MultiLoRA's gates) and
the plots curves.png (average accuracy against steps) and router_entropy.png (when the training
logs hold router_entropy). What is shown comes from curves.build."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlora_cli.report.common import pyplot, save_png

from .curves import FOLDED


def pct(s: dict[str, Any]) -> str:
    """A spread (stats.spread) as a percentage: mean ± std."""
    if s["mean"] is None:
        return "-"
    return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['std']:.1f}" if s["std"] is not None else "")


def _points(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def accuracy_table(tasks: list[str], base: dict[str, Any], methods: dict[str, Any], last: str,
                   last_cell: Callable[[dict[str, Any]], str]) -> list[str]:
    """The accuracy table of both reports: per task and on average (%, mean ± std over seeds), the
    base model first, each row's change of the average against it, and one last column of the
    caller's (`last`, each row's cell from `last_cell`)."""
    head = ["method", "trainable params", *tasks, "average", "Δ avg vs base", last]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
             "| base model (before training) | 0 | " + " | ".join(pct(base["tasks"][t]) for t in tasks)
             + f" | {pct(base['average'])} | | |"]
    for m, r in methods.items():
        avg, base_avg = r["average"]["mean"], base["average"]["mean"]
        cells = [m, f"{r['trainable_parameters']:,}", *(pct(r["tasks"][t]) for t in tasks), pct(r["average"]),
                 "-" if avg is None or base_avg is None else _points(avg - base_avg), last_cell(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The whole results.md of the learning curves."""
    budgets, by_budget = results["budgets"], results["by_budget"]
    lines = [_intro(results), ""]
    for n in budgets:
        lines += _budget_section(n, by_budget[str(n)], results)
    lines += ["## The ordering across budgets", ""]
    lines += [f"- {n} steps: {' > '.join(by_budget[str(n)]['ordering'])}" for n in budgets]
    lines.append("")
    for c in results["ordering_changes"]:
        lines.append(f"Between {c['from']} and {c['to']} steps the ordering changes: "
                     f"{' > '.join(c['before'])} becomes {' > '.join(c['after'])}.")
    if not results["ordering_changes"]:
        lines.append("The ordering is the same at every budget." if len(budgets) > 1 else
                     "One budget: no change to see.")
    lines += ["", *_usage_section(results["router_usage"])]
    lines += _gates_section(results["gates"])
    rows = {m: r for b in by_budget.values() for m, r in b["methods"].items() if FOLDED not in m}
    lines += ["", "Methods: " + "; ".join(f"`{m}` = {r['description']}" for m, r in rows.items()) + "."]
    return "\n".join(lines) + "\n"


def _intro(results: dict[str, Any]) -> str:
    st, budgets = results["settings"], results["budgets"]
    held_out = ", ".join(f"{t} {v['held_out']}" for t, v in results["tasks"].items())
    seeds = results["seeds"]
    return (f"Learning curves: held-out accuracy (%) at {', '.join(map(str, budgets))} steps, seeds "
            f"{', '.join(map(str, seeds))} (a seed sets the split, the initialisation and the data order); "
            f"model {st.get('model', '?')}; r = {st.get('r', '?')}, "
            f"heads = {st.get('num_heads', '?')}, targets {st.get('target_modules', '?')}. One run per "
            f"(variant, seed) at a constant learning rate after warm-up, trained one budget at a time and "
            f"scored at each; each budget is that run's checkpoint. Held-out per task: {held_out}.")


def _budget_section(n: int, summary: dict[str, Any], results: dict[str, Any]) -> list[str]:
    def loss(r: dict[str, Any]) -> str:
        return "-" if r["train_loss"]["mean"] is None else f"{r['train_loss']['mean']:.3f}"

    seeds = ", ".join(map(str, summary["row_seeds"]))
    lines = [f"## {n} steps", "", f"Rows: mean ± std over seeds {seeds}, the seeds every variant has at "
             "this budget (the same held-out sets); the paired differences below take every seed both "
             "sides have.", "",
             *accuracy_table(list(results["tasks"]), summary["base"], summary["methods"],
                             "train loss", loss)]
    if summary["comparisons"]:
        lines += ["", f"Paired differences of the average (A − B, points): bootstrap over each task's "
                      f"held-out examples within each seed, {summary['comparisons'][0]['replicates']} "
                      "replicates, 95% percentile interval.", "",
                  "| comparison | mean diff | 95% CI | resolved | seeds |", "|---|---:|---:|:---:|---|"]
        for c in summary["comparisons"]:
            ci = f"[{_points(c['ci'][0])}, {_points(c['ci'][1])}]"
            lines.append(f"| {c['a']} − {c['b']} | {_points(c['diff'])} | {ci} | "
                         f"{'yes' if c['resolved'] else 'no'} | {', '.join(map(str, c['seeds']))} |")
    lines += ["", f"Ordering by average accuracy: {' > '.join(summary['ordering'])}.", ""]
    return lines


def _usage_section(usage: dict[str, Any]) -> list[str]:
    if not usage:
        return []
    lines = ["## Router usage per task (the folds)", "",
             "Entropy in nats (ln n = uniform over n heads) of each task's fold (its mixture averaged "
             "over modules) and per module; then the largest L1 distance between two tasks' mixtures, "
             "per module (0 = the same use of the heads, 2 = disjoint heads). Means over tasks, then "
             "over seeds.", "",
             "| variant | steps | fold entropy | per-module entropy | uniform | largest task-pair L1 "
             "| between |", "|---|---:|---:|---:|---:|---:|---|"]
    for m, by_budget in usage.items():
        for n, u in by_budget.items():
            module = "-" if u["module_entropy"] is None else f"{u['module_entropy']:.3f}"
            l1 = "-" if u["max_l1"] is None else f"{u['max_l1']:.3f}"
            pair = " / ".join(u["max_l1_tasks"] or [])
            lines.append(f"| {m} | {n} | {u['fold_entropy']:.3f} | {module} | {u['uniform_entropy']:.3f} | "
                         f"{l1} | {pair} |")
    return lines


def _gates_section(gates: dict[str, Any]) -> list[str]:
    if not gates:
        return []
    lines = ["", "## MultiLoRA's gates", "",
             "Per head, the mean |g_i| over the adapted modules (mean over seeds), and the largest |g_i| "
             "of any module; the gates start at 0.", "",
             "| variant | steps | mean \\|g_i\\| per head | largest \\|g_i\\| | seeds |",
             "|---|---:|---|---:|---:|"]
    for m, by_budget in gates.items():
        for n, g in by_budget.items():
            heads = " / ".join(f"{v:.3g}" for v in g["mean_abs"])
            lines.append(f"| {m} | {n} | {heads} | {g['max_abs']:.3g} | {g['seeds']} |")
    return lines


def plot_curves(results: dict[str, Any], path: Path) -> Path:
    """Average held-out accuracy against steps (log scale), per variant: mean over seeds, ± std."""
    plt = pyplot()
    budgets = results["budgets"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = list(dict.fromkeys(m for b in results["by_budget"].values() for m in b["methods"]))
    routed = [m for m in names if not m.endswith(FOLDED)]  # a fold takes its variant's colour, dashed
    for name in names:
        points = [(n, results["by_budget"][str(n)]["methods"].get(name)) for n in budgets]
        points = [(n, r["average"]) for n, r in points if r and r["average"]["mean"] is not None]
        xs, mean = [n for n, _ in points], [s["mean"] for _, s in points]
        std = [s["std"] or 0.0 for _, s in points]
        color = f"C{routed.index(name.removesuffix(FOLDED)) % 10}"
        style = "--" if name.endswith(FOLDED) else "-"
        ax.plot(xs, mean, style, marker="o", color=color, label=name)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.12)
    base = results["by_budget"][str(budgets[0])]["base"]  # over the first budget's rows' seeds
    if base["average"]["mean"] is not None:
        ax.axhline(base["average"]["mean"], color="grey", linestyle=":", label="base model")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(n) for n in budgets])
    ax.minorticks_off()
    ax.set(xlabel="optimizer steps", ylabel="average held-out accuracy",
           title="Learning curves (mean over seeds, ± std)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_router_entropy(results: dict[str, Any], path: Path) -> Path | None:
    """router_entropy of the training logs against steps, per variant (mean over seeds); None
    when no log has it."""
    series = results.get("router_entropy") or {}
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    styles = ("-", "--", ":", "-.")  # variants whose routers stay alike draw on top of each other
    for i, (m, s) in enumerate(series.items()):
        ax.plot(s["steps"], s["entropy"], styles[i % len(styles)], label=m, linewidth=1.6)
    ax.set(xlabel="optimizer step", ylabel="router entropy (nats)", title="Router entropy during training")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_png(fig, path)
