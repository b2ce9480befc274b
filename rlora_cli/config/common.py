"""What every recipe section shares: how a section reports its problems.

Each section is a frozen dataclass with a docstring and a default per field, and checks itself
when built: `__post_init__` calls `validate`, which raises one `UserError` listing every problem
at its YAML path, so `TrainConfig(learning_rate=-1)` fails in Python as it does in a recipe.
"""

from __future__ import annotations

from typing import Any

from rlora_cli.errors import collect

FIX = "fix the recipe (recipes/demo.yaml is a complete example; rlora_cli/config/ documents every key)"


def validate(section: Any) -> None:
    """Raise one UserError listing every problem of a section (its `__post_init__` calls this).
    Types, nan, inf and 32-bit integer bounds are the YAML's to get right: `recipe/typed.py`
    checks them as it reads; the comparisons here are written so that nan fails them too."""
    collect(section.problems(section.WHERE), FIX)


def choice(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    return f"{where}: unknown value {value!r}; choose one of {', '.join(allowed)}"
