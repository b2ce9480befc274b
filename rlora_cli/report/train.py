"""What `rlora train` shows: the start banner, its one-line notes, the progress bar, and the loss
plots (PNG) it leaves in OUT/plots.

    console = train_console(console, accelerator.is_main_process)
    with TrainProgress(console, total, done, main) as progress: progress.update(row)
    plot_losses(metrics_rows, out / "plots")

Everything here renders what the loop hands it; the loop computes and writes the data (its
metrics.jsonl is train/metrics.py's). Off the main process the console is quiet. Paths, model
and task names go through `escape`, so `a[bold]x` prints as written.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.panel import Panel
from rich.progress import Progress, TextColumn
from rich.table import Table

from rlora_cli.adapters import adapter_layers
from rlora_cli.report.common import Console, bar_columns, escape, pyplot, save_png


def train_console(console: Any, main: bool) -> Any:
    """The console a run prints to: the caller's (or stdout) on the main process, silent elsewhere."""
    return (console or Console()) if main else Console(quiet=True)


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def banner(console: Any, info: dict[str, Any]) -> None:
    """The start-of-run panel: model, method, trainable parameters, precision, world size."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in info.items():  # values hold paths and names: never read as markup
        table.add_row(escape(key), escape(str(value)))
    console.print(Panel(table, title="rlora train", expand=False))


def train_banner(console: Any, recipe: Any, accelerator: Any, model: Any, data: Any, out: Path,
                 kernels: str, compile_note: str, steps_per_epoch: int, total: int, trainable: int,
                 all_params: int) -> None:
    """`rlora train`'s panel."""
    t, world, bare = recipe.train, accelerator.num_processes, accelerator.unwrap_model(model)
    banner(console, {
        "model": recipe.model.name_or_path,
        "method": f"{recipe.adapter.type} (r={recipe.adapter.r}, heads={recipe.adapter.num_heads}, "
                  f"{len(adapter_layers(bare))} modules)",
        "trainable": f"{format_count(trainable)} of {format_count(all_params)} "
                     f"({100 * trainable / all_params:.3f}%)",
        "data": f"{len(data.train)} examples, {len(data.tasks)} tasks; "
                f"{steps_per_epoch} steps/epoch, {total} steps",
        "batch": f"{t.micro_batch_size} × {t.gradient_accumulation_steps} accumulation × {world} "
                 f"process(es) = {t.micro_batch_size * t.gradient_accumulation_steps * world}",
        "precision": f"{accelerator.mixed_precision} (base stored as "
                     f"{str(next(bare.parameters()).dtype).removeprefix('torch.')})",
        "kernels": kernels,
        "compile": compile_note,
        "device": f"{accelerator.device} × {world}",
        "output": str(out),
    })


# ---------------------------------------------------------------------------- one-line notes


def print_notes(console: Any, notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]warning:[/] {escape(note)}")


def print_resuming(console: Any, checkpoint: Path, step: int, total: int) -> None:
    console.print(f"[green]resuming[/] from {escape(str(checkpoint))} (step {step} of {total})")


def print_eval(console: Any, step: int, losses: dict[str, float]) -> None:
    console.print(f"step {step} held-out loss: "
                  + escape(", ".join(f"{k} {v:.4f}" for k, v in losses.items())))


def print_stopped(console: Any, checkpoint: Path, terminated: bool) -> None:
    """Ctrl-C or SIGTERM: where the run was saved and how to continue it."""
    how = "terminated (SIGTERM)" if terminated else "interrupted"
    console.print(f"[yellow]{how}:[/] saved {escape(str(checkpoint))}; continue with --resume auto")


def print_done(console: Any, steps: int, adapter: Path, plots: Path | None) -> None:
    console.print(f"[green]done:[/] {steps} steps, adapter in {escape(str(adapter))}"
                  + (f", plots in {escape(str(plots))}" if plots else ""))


class TrainProgress:
    """A rich progress bar with step, loss, lr, tokens/s and ETA (silent off the main process)."""

    def __init__(self, console: Any, total: int, done: int, enabled: bool) -> None:
        columns = bar_columns("[bold]train", TextColumn("{task.fields[stats]}"))
        self.bar = Progress(*columns, console=console, disable=not enabled, transient=False)
        self.task = self.bar.add_task("train", total=total, completed=done, stats="")

    def __enter__(self) -> "TrainProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, row: dict[str, Any]) -> None:
        stats = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s"
        self.bar.update(self.task, stats=stats)

    def advance(self, step: int) -> None:
        self.bar.update(self.task, completed=step)


# ---------------------------------------------------------------------------- plots


def smooth(values: list[float], half: int | None = None) -> list[float]:
    """A centred moving mean whose window narrows toward the ends: no lag, and the first and last
    points are the logged values themselves (a trailing mean plots a short run's last loss where
    the loss was several lines earlier). `half`: points each side (default: 2, fewer for < 16)."""
    n = len(values)
    half = min(2, n // 8) if half is None else half
    out = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        window = values[i - h:i + h + 1]
        out.append(sum(window) / len(window))
    return out


def _curve(ax: Any, steps: list[int], values: list[float], color: str, label: str) -> None:
    """The logged points (small markers on a thin line) and their light smoothing."""
    ax.plot(steps, values, ".-", color=color, alpha=0.35, linewidth=0.8, markersize=3)
    ax.plot(steps, smooth(values), color=color, label=label)


def plot_losses(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """loss.png (training and held-out loss) and task_loss.png (per task) from metrics.jsonl's
    rows; returns the files written."""
    train = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in rows if "eval_loss" in r]
    if not train and not evals:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_loss(train, evals, out_dir / "loss.png")]
    per_task: dict[str, list[tuple[int, float]]] = defaultdict(list)
    per_task_eval: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in train:
        for task, v in (r.get("task_loss") or {}).items():
            per_task[task].append((r["step"], v))
    for r in evals:
        for task, v in r["eval_loss"].items():
            per_task_eval[task].append((r["step"], v))
    if per_task or per_task_eval:
        written.append(_plot_task_loss(per_task, per_task_eval, out_dir / "task_loss.png"))
    return written


def _plot_loss(train: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    if train:
        _curve(ax, [r["step"] for r in train], [r["loss"] for r in train], "C0", "train")
    if evals:
        ax.plot([r["step"] for r in evals], [_mean(r["eval_loss"]) for r in evals], "o-", color="C3",
                label="held-out (mean over tasks)")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _plot_task_loss(per_task: dict[str, list[tuple[int, float]]],
                    per_task_eval: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for i, task in enumerate(sorted(set(per_task) | set(per_task_eval))):
        if per_task.get(task):
            s, v = zip(*per_task[task])
            _curve(ax, list(s), list(v), f"C{i}", f"{task} train")
        if per_task_eval.get(task):
            s, v = zip(*per_task_eval[task])
            ax.plot(s, v, "o--", color=f"C{i}", label=f"{task} held-out")
    ax.set(xlabel="step", ylabel="loss", title="Loss per task")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / max(len(d), 1)
