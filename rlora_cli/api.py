"""Training from Python: `train` runs a recipe as `rlora train` does and returns what it made.

    from rlora_cli import train
    result = train("recipes/demo.yaml", ["train.max_steps=20"], output="runs/demo")
    result.adapter_dir, result.metrics["loss"], result.metrics["eval_loss"]["reviews"]

The recipe is a YAML path, a dict of the YAML's shape, or a `Recipe` built in code (load_recipe
checks all three alike). The run folder is the CLI's, file for file. Nothing is printed unless a
console is passed: `rich.console.Console()` shows the CLI's banner, progress and summary.

(The name is not `train`: that is the `rlora_cli.training` package, which Python binds to
`rlora_cli.training` as soon as any of its modules is imported.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from huggingface_hub.utils import are_progress_bars_disabled as hub_bars_disabled
from huggingface_hub.utils import disable_progress_bars as disable_hub_bars
from huggingface_hub.utils import enable_progress_bars as enable_hub_bars
from rich.console import Console
from transformers.utils import logging as hf_logging

from rlora_cli.recipe.load import RecipeSource
from rlora_cli.runs import read_metrics
from rlora_cli.training.loop import train as run_training


@dataclass(frozen=True)
class TrainResult:
    """What a finished run made: its folder, its adapter and its last logged numbers."""

    run_dir: Path
    adapter_dir: Path
    """RUN/adapter: load it with `load_adapter` or `rlora_cli.model.load_model(base, adapter=...)`."""
    metrics: dict[str, Any]
    """The last train row of RUN/metrics.jsonl (step, epoch, loss, task_loss per task, tokens, lr,
    grad_norm, throughput) and `eval_loss`: the last held-out loss per task ({} without any)."""


def train(recipe: RecipeSource, overrides: tuple[str, ...] | list[str] = (), *,
          output: str | Path | None = None, resume: str = "never", overwrite: bool = False,
          console: Any = None) -> TrainResult:
    """Train the recipe's adapter, as `rlora train RECIPE [OVERRIDES] --output OUT` does.

    `overrides`: dotted KEY=VALUE strings, as on the command line. `output`: the run folder
    (default: the recipe's output.dir). `resume`: never | auto | a checkpoint folder. `overwrite`:
    delete a non-empty run folder first. `console`: a rich Console to print to (default: none).
    Raises UserError (the message the CLI prints) for bad input, and TrainingDiverged when the
    loss becomes NaN or infinite (the last good checkpoint is kept)."""
    with nullcontext() if console is not None else _library_bars_off():
        run_dir = run_training(recipe, tuple(overrides), output=output, resume=resume, overwrite=overwrite,
                               console=console if console is not None else Console(quiet=True))
    return TrainResult(run_dir=run_dir, adapter_dir=run_dir / "adapter",
                       metrics=final_metrics(read_metrics(run_dir / "metrics.jsonl")))


@contextmanager
def _library_bars_off() -> Iterator[None]:
    """datasets (reading, tokenizing), transformers (loading weights) and the hub (downloads)
    draw their own progress bars on stderr; a silent run turns them off, then back as they were."""
    switches = [(datasets.is_progress_bar_enabled, datasets.disable_progress_bars,
                 datasets.enable_progress_bars),
                (hf_logging.is_progress_bar_enabled, hf_logging.disable_progress_bar,
                 hf_logging.enable_progress_bar),
                (lambda: not hub_bars_disabled(), disable_hub_bars, enable_hub_bars)]
    were_on = [on() for on, _, _ in switches]
    for _, off, _ in switches:
        off()
    try:
        yield
    finally:
        for (_, _, back_on), was_on in zip(switches, were_on):
            if was_on:
                back_on()


def final_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last train row of a metrics.jsonl, with the last held-out losses as `eval_loss`."""
    trained = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    return {**(trained[-1] if trained else {}), "eval_loss": evals[-1]["eval_loss"] if evals else {}}
