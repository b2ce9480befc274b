"""rlora: multi-task fine-tuning of causal LMs with multi-head low-rank adapters.

The Python API (heavy imports happen on first use, so `rlora --help` stays fast):
`AdapterConfig`, `inject_adapters`, `save_adapter`, `load_adapter`, `merge_adapters`,
`load_recipe`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "AdapterConfig": "rlora_cli.adapters",
    "inject_adapters": "rlora_cli.adapters",
    "merge_adapters": "rlora_cli.adapters",
    "save_adapter": "rlora_cli.checkpoint",
    "load_adapter": "rlora_cli.checkpoint",
    "load_recipe": "rlora_cli.recipe.load",
    "UserError": "rlora_cli.errors",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'rlora_cli' has no attribute {name!r}")
