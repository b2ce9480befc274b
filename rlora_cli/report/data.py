"""What the data looks like on a terminal: the mixture table with its warnings, and one example as
the model sees it (prompt dim, trained tokens highlighted).

    print_mixture(prepared.mixture, console)      # data/mixture.py's MixtureReport
    console.print(example_panel(view))            # train/preview.py's ExampleView

Everything here renders what it is handed. Task names, paths and example text are the user's, so
they reach rich as `Text` or through `escape`: `a[bold]x` prints as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rlora_cli.report.common import escape


def mixture_table(report: Any) -> Table:
    """A mixture report (data/mixture.py's MixtureReport) as a table, one row per source."""
    packed = f", packed into {report.rows:,} rows" if report.packing else ""
    table = Table(title=f"Mixture: {report.examples:,} examples per epoch{packed}, "
                        f"{report.trained_tokens:,} trained tokens (T = {report.temperature:g})")
    for header in ("source", "kind", "rows", "held out", "used", "examples", "trained tokens", "truncated"):
        table.add_column(header, justify="left" if header in ("source", "kind") else "right")
    for s in report.sources:
        epochs = f" ({s.used / s.train_rows:.1f}x)" if s.used > s.train_rows else ""
        table.add_row(escape(s.name), s.kind, f"{s.rows:,}", f"{s.val_rows:,}", f"{s.used:,}{epochs}",
                      f"{s.share_examples:.1%}", f"{s.share_tokens:.1%}", f"{s.truncated:,}")
    return table


def print_mixture(report: Any, console: Any) -> None:
    """The table, then a warning for truncated examples and for each source that contributes none."""
    console.print(mixture_table(report))
    truncated = sum(s.truncated for s in report.sources)
    if truncated:
        console.print(f"[yellow]{truncated:,} training examples are longer than data.max_length="
                      f"{report.max_length} and lose tokens from the prompt side[/]")
    for s in report.sources:
        if s.used == 0:
            console.print(f"[yellow]{escape(s.name)} contributes no training examples: raise its weight or "
                          "num_samples[/]")


def example_panel(view: Any) -> Panel:
    """An example (train/preview.py's ExampleView) as the model sees it: its text in runs, prompt
    dim and trained tokens highlighted, titled with its task, kind and token counts."""
    text = Text()
    for piece, trained in view.runs:
        text.append(piece, style="bold green" if trained else "dim")
    title = Text(f"{view.task} ({view.kind}): {view.tokens} tokens, {view.trained} trained"
                 + (", truncated" if view.truncated else ""))
    return Panel(text, title=title, subtitle="[dim]prompt[/] / [bold green]trained[/]")


def print_dry_run_ok(console: Any, recipe_path: str | Path) -> None:
    """The dry run's last line: what was checked, and that nothing was trained."""
    console.print(f"[green]dry run ok[/]: {escape(str(recipe_path))} is valid and its data loads; no model "
                  "weights were loaded and nothing was trained.")
