"""`rlora train --dry-run`: check a recipe and its data without loading any model weights.

    dry_run("recipes/demo.yaml", ["data.max_length=256"], console)

Validates the recipe, loads the tokenizer and the data (split, mixed and tokenized exactly as a
run does, so the mixture shown is the one training would use), then shows one example per source
as the model sees it. `view_example` returns that example as data; report/data.py renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlora_cli.config import Recipe
from rlora_cli.data.packing import IGNORE
from rlora_cli.data.pipeline import prepare, tokenize_example
from rlora_cli.data.templates import Example
from rlora_cli.model import load_tokenizer
from rlora_cli.recipe.load import load_recipe
from rlora_cli.report.common import Console
from rlora_cli.report.data import example_panel, print_dry_run_ok


@dataclass(frozen=True)
class ExampleView:
    """One example as training encodes it, in decoded runs of prompt or trained tokens."""

    task: str
    kind: str
    runs: list[tuple[str, bool]]
    """(decoded text, trained) for each maximal run of tokens that are all trained or all not."""
    tokens: int
    trained: int
    truncated: bool


def dry_run(recipe_path: str | Path, overrides: tuple[str, ...] | list[str] = (),
            console: Any = None) -> None:
    """Validate the recipe, load the tokenizer (no model weights) and the data, print the mixture
    and one rendered example per source with its trained tokens highlighted."""
    console = console or Console()
    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    prepared = prepare(recipe, tokenizer, console)
    for d in recipe.data.datasets:
        show_example(prepared.samples[d.name], tokenizer, console, template=d.template, recipe=recipe)
    print_dry_run_ok(console, recipe_path)


def show_example(example: Example, tokenizer: Any, console: Any, *, template: str, recipe: Recipe) -> None:
    """Print an example as the model sees it: prompt dim, trained tokens highlighted."""
    console.print(example_panel(view_example(example, tokenizer, template=template, recipe=recipe)))


def view_example(example: Example, tokenizer: Any, *, template: str, recipe: Recipe) -> ExampleView:
    """Encode an example with the recipe's settings and cut it into runs of prompt and trained
    tokens; each run is decoded whole, so multi-token characters come out intact."""
    e = tokenize_example(example, tokenizer, template=template, max_length=recipe.data.max_length,
                         train_on_prompt=recipe.data.train_on_prompt)
    runs: list[tuple[str, bool]] = []
    run: list[int] = []
    trained = False
    for token, label in zip(e.input_ids + [None], e.labels + [None]):
        is_trained = label is not None and label != IGNORE
        if token is None or (run and is_trained != trained):
            runs.append((tokenizer.decode(run), trained))
            run = []
        if token is not None:
            run, trained = run + [token], is_trained
    return ExampleView(task=example.task, kind=example.kind, runs=runs, tokens=len(e.input_ids),
                       trained=sum(1 for x in e.labels if x != IGNORE), truncated=e.truncated)
