"""What per-task folding prints: where each task's routing was measured, the mixture it fixed,
what was written, and the `vllm serve` line (or why vLLM cannot load the adapters).

    print_fold(fold, console)                       # one task: rows, tokens, mixture, entropy
    print_folds(folds, "peft/", rank, console)      # a table, then what was written
    print_vllm(command, why, console)

Every function takes what `fold.py` returned and prints nothing without a console; paths and
task names are printed literally.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from rlora_cli.report.common import escape


def _mixture(weights: list[float]) -> str:
    return "[" + ", ".join(f"{w:.3f}" for w in weights) + "]"


def _entropy(fold: Any) -> str:
    return f"{fold.entropy:.3f} nats (uniform: {math.log(len(fold.mixture)):.3f})"


def print_fold(fold: Any, console: Any) -> None:
    """One line: the task, where its rows came from, how many, and the mixture it fixed."""
    if console is None:
        return
    console.print(f"[bold]{escape(fold.task)}[/]: routing measured over {fold.examples} examples "
                  f"({fold.tokens} tokens) from {escape(fold.source)}; fixed head mixture "
                  f"{_mixture(fold.mixture)} (mean over modules), entropy {_entropy(fold)}", highlight=False)


def print_folds(folds: dict[str, Any], output: str | Path, rank: int, console: Any) -> None:
    """The folds as a table (several tasks) or a line (one), then what was written."""
    if console is None:
        return
    if len(folds) == 1:
        print_fold(next(iter(folds.values())), console)
    else:
        table = Table(title="per-task folds (the mixture is the mean over modules)")
        numbers = ("examples", "tokens", "entropy (nats)")
        for col in ("task", *numbers[:2], "mixture", numbers[2], "rows from"):
            table.add_column(col, justify="right" if col in numbers else "left")
        for f in folds.values():
            table.add_row(escape(f.task), str(f.examples), str(f.tokens), _mixture(f.mixture),
                          f"{f.entropy:.3f}", escape(f.source))
        console.print(table)
    what = ("a PEFT LoRA" if len(folds) == 1 else
            f"{len(folds)} PEFT LoRAs (one per task, tasks.json lists them)")
    console.print(f"[green]exported[/] {what} of rank {rank} to {escape(str(output))}", highlight=False)


def print_not_needed(method: str, console: Any) -> None:
    """A static adapter given --task or --per-task: it is written as it is."""
    if console is not None:
        console.print(f"[yellow]note:[/] this {escape(method)} adapter has no softmax router, so its ΔW "
                      "is the same for every task: folding is not needed, it is written as it is",
                      highlight=False)


def print_vllm(command: str | None, why: str | None, console: Any) -> None:
    """The ready-to-run `vllm serve` line, or the one-line reason there is none."""
    if console is None:
        return
    if command is None:
        console.print(f"[yellow]no vLLM line:[/] {escape(why or '')}", highlight=False)
        return
    console.print("serve every task's LoRA with vLLM (a request picks one by its name as the model):",
                  highlight=False)
    console.print(escape(command), highlight=False, soft_wrap=True)
