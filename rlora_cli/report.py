"""What a run shows and leaves behind: metrics.jsonl, the start banner, and PNG plots.

Only the main process calls these. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per logged step to OUT/metrics.jsonl (kept across resumes)."""

    def __init__(self, path: Path, *, resume_step: int = 0) -> None:
        self.path = path
        if path.exists():  # on resume, drop rows past the checkpoint we restart from
            rows = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: skip it, keep the rest
    return rows


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def banner(console: Any, info: dict[str, Any]) -> None:
    """The start-of-run panel: model, method, trainable parameters, precision, world size."""
    from rich.panel import Panel
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(Panel(table, title="rlora train", expand=False))


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def plot_losses(metrics_path: Path, out_dir: Path) -> list[Path]:
    """loss.png (training and held-out loss) and task_loss.png (per task); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in rows if "eval_loss" in r]
    if not train and not evals:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], alpha=0.35, color="C0")
        ax.plot(steps, _smooth([r["loss"] for r in train]), color="C0", label="train (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [_mean(r["eval_loss"]) for r in evals], "o-", color="C3",
                label="held-out (mean over tasks)")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "loss.png"))

    per_task: dict[str, list[tuple[int, float]]] = defaultdict(list)
    per_task_eval: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in train:
        for task, v in (r.get("task_loss") or {}).items():
            per_task[task].append((r["step"], v))
    for r in evals:
        for task, v in r["eval_loss"].items():
            per_task_eval[task].append((r["step"], v))
    if per_task or per_task_eval:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, task in enumerate(sorted(set(per_task) | set(per_task_eval))):
            if per_task.get(task):
                s, v = zip(*per_task[task])
                ax.plot(s, _smooth(list(v)), color=f"C{i}", label=f"{task} train")
            if per_task_eval.get(task):
                s, v = zip(*per_task_eval[task])
                ax.plot(s, v, "o--", color=f"C{i}", label=f"{task} held-out")
        ax.set(xlabel="step", ylabel="loss", title="Loss per task")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "task_loss.png"))
    return written


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / max(len(d), 1)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
