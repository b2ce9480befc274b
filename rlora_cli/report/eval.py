"""What `rlora eval` and `rlora generate` show: the results table, the compare table and chart,
load warnings, and progress that stays silent without a console.

    print_results(results, console)             # one row per task, then overall and mean
    print_comparison(comparison, console)       # B − A per task
    print_routed_vs_folded(routed, console)     # --compare-routed: folded − routed per task
    plot_comparison(comparison, "delta.png", "A: base", "B: tuned")

Every function takes the data `eval/results.py` (or `model.load_with_adapter`) returned; text
that came from users (task names, paths) is escaped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.table import Table

from rlora_cli.report.common import escape, progress_bar, pyplot, save_png

# Metrics where a smaller value is better: their deltas are green when negative.
LOWER_IS_BETTER = ("loss", "perplexity")


@contextmanager
def progress(console: Any, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """`report.common.progress_bar` on `console`; without a console, a no-op `advance`."""
    if console is None:
        yield lambda k: None
        return
    with progress_bar(console, total, label) as advance:
        yield advance


# The one-line notes below print nothing without a console, so components and commands can
# call them unconditionally.


def print_warnings(warnings: list[str], console: Any) -> None:
    """Each warning as one yellow-tagged line, its text literal."""
    for text in warnings if console is not None else ():
        console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)


def print_note(text: str, console: Any) -> None:
    """A dim line of literal text (what is loaded, before a streamed answer)."""
    if console is not None:
        console.print(f"[dim]{escape(text)}[/]", highlight=False)


def print_written(what: str, path: str | Path, console: Any) -> None:
    """"<what> written to <path>", the path literal."""
    if console is not None:
        console.print(f"{escape(what)} written to {escape(str(path))}")


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def print_results(results: dict[str, Any], console: Any) -> None:
    """A rich table: one row per task, then the overall and the mean accuracy."""
    if console is None:
        return
    extras = [k for k in ("f1", "loss", "perplexity") if any(k in v for v in results["tasks"].values())]
    table = Table(title=escape(f"{results['task']}: {results['model']}"
                               + (f" + {results['adapter']}" if results["adapter"] else "")))
    for col in ("task", "n", "accuracy", *extras):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, rec in results["tasks"].items():
        table.add_row(escape(name), _fmt(rec.get("n")), _fmt(rec.get("accuracy")),
                      *(_fmt(rec.get(k)) for k in extras))
    table.add_section()
    table.add_row("overall", _fmt(results["n"]), _fmt(results["accuracy"]), *("" for _ in extras))
    table.add_row("mean over tasks", "", _fmt(results["mean_accuracy"]), *("" for _ in extras))
    console.print(table)


def print_comparison(comparison: dict[str, Any], console: Any) -> None:
    """The B − A table of `results.comparison`: one row per task on its metric (↓: lower is
    better), then the overall and the mean accuracy."""
    if console is None:
        return
    table = Table(title=escape(f"B − A   (A = {comparison['a']}, B = {comparison['b']})"))
    for col in ("task", "metric", "A", "B", "Δ"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, row in comparison["tasks"].items():
        metric = row["metric"] + (" ↓" if row["metric"] in LOWER_IS_BETTER else "")
        table.add_row(escape(name), metric, _fmt(row["a"]), _fmt(row["b"]), _signed(row["delta"]))
    table.add_section()
    for name in ("accuracy", "mean_accuracy"):
        row = comparison[name]
        table.add_row("overall" if name == "accuracy" else "mean over tasks", "accuracy",
                      _fmt(row["a"]), _fmt(row["b"]), _signed(row["delta"]))
    console.print(table)


def print_routed_vs_folded(comparison: dict[str, Any], console: Any) -> None:
    """`results.routed_vs_folded` as a table: per task the metric with the router routing per
    token and fixed to the task's fold (what its merge or PEFT export computes), and the cost."""
    if console is None:
        return
    table = Table(title="routed vs folded (the router fixed to each task's fold; Δ = folded − routed)")
    for col in ("task", "metric", "routed", "folded", "Δ", "fold mixture"):
        table.add_column(col, justify="left" if col in ("task", "metric", "fold mixture") else "right")
    for name, row in comparison["tasks"].items():
        metric = row["metric"] + (" ↓" if row["metric"] in LOWER_IS_BETTER else "")
        mixture = "[" + ", ".join(f"{w:.3f}" for w in row["fold"]["mixture"]) + "]"
        table.add_row(escape(name), metric, _fmt(row["routed"]), _fmt(row["folded"]), _signed(row["delta"]),
                      mixture)
    table.add_section()
    mean = comparison["mean_accuracy"]
    table.add_row("mean over tasks", "accuracy", _fmt(mean["routed"]), _fmt(mean["folded"]),
                  _signed(mean["delta"]), "")
    console.print(table)


# --------------------------------------------------------------------------------- the chart


def plot_comparison(comparison: dict[str, Any], path: str | Path, label_a: str, label_b: str) -> Path:
    """Write `comparison_figure` as a PNG (atomically)."""
    # The figure lays itself out around the legend above the panels: no second tight_layout.
    return save_png(comparison_figure(comparison, label_a, label_b), path, tight=False)


def comparison_figure(comparison: dict[str, Any], label_a: str, label_b: str) -> Any:
    """Grouped bars of A and B per task, Δ above each pair (green when B is better): one panel
    for accuracy-type metrics (with the overall accuracy), one for loss-type metrics, whose scale
    and direction differ — so every task of both files appears."""
    plt = pyplot()
    tasks = comparison["tasks"].items()
    higher = [(k, v) for k, v in tasks if v["metric"] not in LOWER_IS_BETTER]
    higher.append(("overall", {"metric": "accuracy", **comparison["accuracy"]}))
    lower = [(k, v) for k, v in tasks if v["metric"] in LOWER_IS_BETTER]
    panels = [p for p in (higher, lower) if p]
    width = max(6.0, 0.7 * (len(higher) + len(lower)) + 2.5 * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [len(p) + 1 for p in panels]})
    for ax, rows in zip(axes[0], panels):
        _bars(ax, rows, label_a, label_b, lower_is_better=rows is lower)
    # One legend above the panels: inside a panel it would cover a bar or its Δ.
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return fig


def _bars(ax: Any, rows: list[tuple[str, dict[str, Any]]], label_a: str, label_b: str, *,
          lower_is_better: bool) -> None:
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["a"] or 0 for _, r in rows], width=0.4, label=label_a)
    ax.bar([x + 0.2 for x in xs], [r["b"] or 0 for _, r in rows], width=0.4, label=label_b)
    for x, (_, r) in zip(xs, rows):
        if r["delta"] is not None:
            better = (r["delta"] < 0) == lower_is_better and r["delta"] != 0
            ax.annotate(f"{r['delta']:+.3f}", (x, max(r["a"] or 0, r["b"] or 0)), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points",
                        color="green" if better else "firebrick" if r["delta"] != 0 else "black")
    names = [name + {"f1": " (F1)", "perplexity": " (perplexity)"}.get(r["metric"], "") for name, r in rows]
    ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
    if lower_is_better:
        ax.set_ylabel("held-out loss (lower is better ↓)")
        ax.set_title("loss-scored tasks", fontsize=9)
        ax.set_ylim(0, 1.2 * max([r[k] or 0 for _, r in rows for k in ("a", "b")] + [1e-9]))
    else:
        ax.set_ylabel("accuracy or F1 (higher is better ↑)")
        ax.set_title("accuracy-scored tasks", fontsize=9)
        ax.set_ylim(0, 1.1)
