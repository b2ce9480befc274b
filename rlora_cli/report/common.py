"""What every renderer shares: a console, a progress bar, and pyplot with an atomic PNG writer.

Components return data and call nothing here but `progress_bar`; the commands render their
results through the modules beside this one. Text from users goes through `escape` before rich
sees it, so `a[bold]x` prints as written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rlora_cli.files import atomic_save_figure

__all__ = ["Console", "bar_columns", "escape", "progress_bar", "pyplot", "save_png"]


def bar_columns(label: str, *extra: Any) -> tuple[Any, ...]:
    """The columns every rlora progress bar shows: label, bar, done/total, `extra`, elapsed, ETA."""
    return (TextColumn(label), BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn(),
            TimeRemainingColumn())


@contextmanager
def progress_bar(console: Any, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar; yields `advance(k)`. `label` prints literally (it may hold a path)."""
    with Progress(*bar_columns("{task.description}"), console=console, transient=True) as bar:
        handle = bar.add_task(escape(label), total=total)
        yield lambda k: bar.advance(handle, k)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, *, tight: bool = True, dpi: int = 120) -> Path:
    """Write a figure atomically and close it. A colorbar shared by several axes does not survive
    tight_layout, so those figures pass tight=False and are saved with a tight bounding box."""
    if tight:
        fig.tight_layout()
    try:
        return atomic_save_figure(fig, path, dpi=dpi, bbox_inches=None if tight else "tight")
    finally:
        pyplot().close(fig)
