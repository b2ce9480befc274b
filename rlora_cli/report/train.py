"""What a run shows and leaves behind: metrics.jsonl, the start banner, the progress bar,
run_info.json and PNG plots.

Only the main process writes these (the progress bar is silent on the others). Plots use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from rlora_cli.runs import read_metrics


class MetricsLog:
    """Appends one JSON object per logged step to OUT/metrics.jsonl (kept across resumes)."""

    def __init__(self, path: Path, *, resume_step: int = 0) -> None:
        from rlora_cli.files import atomic_write_text

        self.path = path
        if path.exists():  # on resume, drop rows past the checkpoint we restart from
            rows = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            # Through a temporary file: a full disk must not leave the log cut short.
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def banner(console: Any, info: dict[str, Any]) -> None:
    """The start-of-run panel: model, method, trainable parameters, precision, world size."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in info.items():  # values hold paths and names: never read as markup
        table.add_row(escape(key), escape(str(value)))
    console.print(Panel(table, title="rlora train", expand=False))


def train_banner(console: Any, recipe: Any, accelerator: Any, model: Any, data: Any, out: Path, kernels: str,
                 compile_note: str, steps_per_epoch: int, total: int, trainable: int, all_params: int) -> None:
    """`rlora train`'s panel."""
    from rlora_cli.adapters import adapter_layers

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


def run_info(recipe: Any, accelerator: Any, trainable: int, total: int) -> dict[str, Any]:
    """OUT/run_info.json: versions, device, precision and sizes, for reproducing a run."""
    import platform

    import accelerate
    import torch
    import transformers

    from rlora_cli import __version__

    return {
        "rlora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "python": platform.python_version(),
        "seed": recipe.seed, "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "precision": accelerator.mixed_precision, "distributed": str(accelerator.distributed_type),
        "trainable_parameters": trainable, "total_parameters": total,
    }


class TrainProgress:
    """A rich progress bar with step, loss, lr, tokens/s and ETA (silent off the main process)."""

    def __init__(self, console: Any, total: int, done: int, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, disable=not enabled, transient=False)
        self.task = self.bar.add_task("train", total=total, completed=done, stats="")

    def __enter__(self) -> "TrainProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, row: dict[str, Any]) -> None:
        self.bar.update(self.task, stats=f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s")

    def advance(self, step: int) -> None:
        self.bar.update(self.task, completed=step)


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
        _curve(ax, [r["step"] for r in train], [r["loss"] for r in train], "C0", "train")
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
                _curve(ax, list(s), list(v), f"C{i}", f"{task} train")
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
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial image behind
        raise
    finally:
        plt.close(fig)
    return path
