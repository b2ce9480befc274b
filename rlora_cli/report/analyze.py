"""`rlora analyze` rendered: its plots and the summary table, from `analyze()`'s dicts.

`analyses` maps a label ("rlora (run)") to one adapter's analysis dict. Files written in OUT:
head_cosine.png (heatmaps for a few modules spread over depth), head_similarity.png (mean
off-diagonal cosine per layer, as in R-LoRA's figure), spectra.png (σ_k/σ_1 and effective rank
per layer), when measured router_usage.png (tasks × heads) and, from a run's training telemetry,
router_entropy.png (router entropy and each task's head usage vs step). With two adapters each
plot shows both. Every PNG is written atomically (`save_png`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from rlora_cli.report.common import escape, pyplot, save_png

HEATMAP_MODULES = 4  # head-cosine heatmaps drawn per adapter, evenly spread over depth


def render_analysis(analyses: dict[str, dict[str, Any]], out: Path, plots: list[Path], console: Any, *,
                    notes: tuple[str, ...] | list[str] = ()) -> None:
    """The notes, a table of means over modules per adapter, and where the files went."""
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    table = Table(title="rlora analyze (means over modules)")
    for col in ("adapter", "modules", "head cosine (off-diag)", "effective rank", "top-1 energy", "|gᵢ|"):
        table.add_column(col, justify="left" if col == "adapter" else "right")
    for label, a in analyses.items():
        mods = list(a["modules"].values())
        keys = ("mean_offdiag_cosine", "effective_rank", "top1_energy")
        table.add_row(escape(label), str(len(mods)), *(_mean_str([m[k] for m in mods]) for k in keys),
                      _gates_str(mods))
    console.print(table)
    names = ", ".join(p.name for p in plots) or "no plots"
    console.print(f"analysis written to {escape(str(out))} ({names})")


def gate_stats(gates: list[list[float]]) -> dict[str, Any]:
    """MultiLoRA's |gᵢ| of several modules (a row of heads each): per head the mean over the rows,
    and the largest of any: whether its gates moved at all."""
    return {"mean_abs": [sum(col) / len(col) for col in zip(*gates)], "max_abs": max(max(g) for g in gates)}


def _gates_str(modules: list[dict[str, Any]]) -> str:
    gates = [m["gate_abs"] for m in modules if "gate_abs" in m]
    if not gates:
        return "-"
    stats = gate_stats(gates)
    return " ".join(f"{g:.3g}" for g in stats["mean_abs"]) + f" (max {stats['max_abs']:.3g})"


def _mean_str(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.4f}" if values else "-"


# ------------------------------------------------------------------------------------ plots


def layer_index(module: str) -> tuple[int | None, str]:
    """(layer number, module kind) of a path: model.layers.3.mlp.up_proj -> (3, 'mlp.up_proj')."""
    m = re.search(r"\.(\d+)\.", module)
    return (int(m.group(1)), module[m.end():]) if m else (None, module)


def write_plots(analyses: dict[str, dict[str, Any]], out: str | Path) -> list[Path]:
    """Every plot the analyses support; `analyses` maps a label to an analysis dict."""
    out = Path(out)
    written = [plot_head_cosine(analyses, out / "head_cosine.png"),
               plot_head_similarity(analyses, out / "head_similarity.png"),
               plot_spectra(analyses, out / "spectra.png"),
               plot_router_usage(analyses, out / "router_usage.png"),
               plot_router_training(analyses, out / "router_entropy.png")]
    return [p for p in written if p is not None]


def _multi_head(analyses: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: a for k, a in analyses.items()
            if any(len(m["head_cosine"]) > 1 for m in a["modules"].values())}


def plot_head_cosine(analyses: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """Heatmaps of the head cosine matrix for a few modules spread over depth, one row per adapter."""
    analyses = _multi_head(analyses)
    if not analyses:
        return None
    plt = pyplot()
    rows = {}
    for label, a in analyses.items():
        names = sorted(a["modules"], key=lambda m: (layer_index(m)[0] or 0, m))
        k = min(HEATMAP_MODULES, len(names))
        rows[label] = [names[round(i * (len(names) - 1) / max(k - 1, 1))] for i in range(k)]
    cols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 3.0 * len(rows)), squeeze=False)
    for r, (label, names) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(names):
                ax.axis("off")
                continue
            matrix = analyses[label]["modules"][names[c]]["head_cosine"]
            cos = [[float("nan") if x is None else x for x in row] for row in matrix]
            im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
            for i, row in enumerate(cos):
                for j, x in enumerate(row):
                    ax.text(j, i, "-" if math.isnan(x) else f"{x:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if not math.isnan(x) and abs(x) > 0.6 else "black")
            ax.set_title(f"{label}\n{names[c]}", fontsize=7)
            ax.set_xticks(range(len(cos)))
            ax.set_yticks(range(len(cos)))
    fig.colorbar(im, ax=axes, shrink=0.6, label="cosine")
    fig.suptitle("Head similarity (cosine of flattened heads)", fontsize=10)
    return save_png(fig, path, tight=False)


def plot_head_similarity(analyses: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """Mean off-diagonal head cosine per layer, one line per adapter and module kind (R-LoRA Fig.)."""
    analyses = _multi_head(analyses)
    if not analyses:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    styles = ["-", "--", ":", "-."]
    for a_i, (label, a) in enumerate(analyses.items()):
        kinds: dict[str, list[tuple[int, float]]] = {}
        for name, m in a["modules"].items():
            layer, kind = layer_index(name)
            if layer is not None and m["mean_offdiag_cosine"] is not None:
                kinds.setdefault(kind, []).append((layer, m["mean_offdiag_cosine"]))
        for k_i, (kind, points) in enumerate(sorted(kinds.items())):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, styles[a_i % len(styles)], marker="o", markersize=3, color=f"C{k_i}",
                    label=f"{label}: {kind}")
    ax.set(xlabel="layer", ylabel="mean off-diagonal cosine", title="Head similarity per layer")
    ax.axhline(0, color="grey", lw=0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_png(fig, path)


def plot_spectra(analyses: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Left: σ_k/σ_1 of ΔW (median over modules, 10–90% band) per adapter; right: effective rank per layer."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, a) in enumerate(analyses.items()):
        spectra = [[s / m["singular_values"][0] for s in m["singular_values"]]
                   for m in a["modules"].values() if m["singular_values"] and m["singular_values"][0] > 0]
        if spectra:
            k = max(len(s) for s in spectra)
            cols = torch.tensor([s + [0.0] * (k - len(s)) for s in spectra])
            xs = list(range(1, k + 1))
            left.plot(xs, cols.median(0).values.tolist(), marker="o", markersize=3, color=f"C{i}",
                      label=label)
            left.fill_between(xs, cols.quantile(0.1, 0).tolist(), cols.quantile(0.9, 0).tolist(),
                              color=f"C{i}", alpha=0.2)
        per_layer: dict[int, list[float]] = {}
        for name, m in a["modules"].items():
            layer, _ = layer_index(name)
            if layer is not None and m["effective_rank"] is not None:
                per_layer.setdefault(layer, []).append(m["effective_rank"])
        if per_layer:
            xs = sorted(per_layer)
            right.plot(xs, [sum(per_layer[x]) / len(per_layer[x]) for x in xs], marker="o", markersize=3,
                       color=f"C{i}", label=label)
    left.set(xlabel="index k", ylabel="σ_k / σ_1", title="ΔW singular values (normalised)")
    right.set(xlabel="layer", ylabel="effective rank exp(H(σ/Σσ))", title="Effective rank of ΔW per layer")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_router_usage(analyses: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """Heatmap tasks × heads of the mean routing weight, one panel per adapter that has it."""
    usable = {k: a["router_usage"] for k, a in analyses.items() if a.get("router_usage")}
    if not usable:
        return None
    plt = pyplot()
    heads = max(len(task["mean"]) for u in usable.values() for task in u.values())
    tasks_n = max(len(u) for u in usable.values())
    fig, axes = plt.subplots(1, len(usable), figsize=((2 + 0.9 * heads) * len(usable), 1.5 + 0.45 * tasks_n),
                             squeeze=False)
    for ax, (label, usage) in zip(axes[0], usable.items()):
        tasks = list(usage)
        grid = [usage[t]["mean"] for t in tasks]
        n = len(grid[0])
        ax.imshow(grid, vmin=0, vmax=max(2.0 / n, max(max(r) for r in grid)), cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, x in enumerate(row):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(n), [f"head {j}" for j in range(n)], fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_title(f"{label}\nmean ω over held-out tokens", fontsize=8)
    return save_png(fig, path)


def plot_router_training(analyses: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """From the telemetry logged while training, one row per adapter that has it: the mean
    router entropy vs step (against ln n, the uniform router's), then one panel per task with the
    mean routing weight of each head vs step."""
    usable = {k: a["router_training"] for k, a in analyses.items() if a.get("router_training")}
    if not usable:
        return None
    plt = pyplot()
    tasks = {label: list(dict.fromkeys(t for r in rows for t in r.get("task_router_usage", {})))
             for label, rows in usable.items()}
    cols = 1 + max(len(t) for t in tasks.values())
    fig, axes = plt.subplots(len(usable), cols, figsize=(3.6 * cols, 3.0 * len(usable)), squeeze=False)
    for row_axes, (label, rows) in zip(axes, usable.items()):
        _entropy_panel(row_axes[0], label, rows)
        for ax, task in zip(row_axes[1:], tasks[label]):
            _usage_panel(ax, task, rows)
        for ax in row_axes[1 + len(tasks[label]):]:
            ax.axis("off")
    fig.suptitle("Routers while training (metrics.jsonl)", fontsize=10)
    return save_png(fig, path)


def _entropy_panel(ax: Any, label: str, rows: list[dict[str, Any]]) -> None:
    ax.plot([r["step"] for r in rows], [r["router_entropy"] for r in rows], marker="o", markersize=2)
    heads = next((len(u) for r in rows for u in r.get("task_router_usage", {}).values()), 0)
    if heads > 1:
        ax.axhline(math.log(heads), color="grey", ls="--", lw=0.8, label=f"uniform (ln {heads})")
        ax.legend(fontsize=7)
    ax.set(xlabel="step", ylabel="mean entropy of ω (nats)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{label}\nrouter entropy", fontsize=8)
    ax.grid(alpha=0.3)


def _usage_panel(ax: Any, task: str, rows: list[dict[str, Any]]) -> None:
    # Not clamped to [0, 1]: early on the heads part by thousandths, which is what there is to see.
    points = [(r["step"], r["task_router_usage"][task]) for r in rows
              if task in r.get("task_router_usage", {})]
    steps = [s for s, _ in points]
    for head in range(len(points[0][1])):
        ax.plot(steps, [u[head] for _, u in points], marker="o", markersize=2, label=f"head {head}")
    ax.set(xlabel="step", ylabel="mean ω over the task's tokens")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"task {task}: head usage", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
