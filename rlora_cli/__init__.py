"""rlora: multi-task fine-tuning of causal LMs with multi-head low-rank adapters.

The Python API (heavy imports happen on first use, so `rlora --help` stays fast):
`train` (a recipe's run, as `rlora train` does it; returns a `TrainResult`), the recipe
and its sections built in code (`Recipe`, `ModelConfig`, `AdapterConfig`, `DataConfig`,
`DatasetConfig`, `TrainConfig`, `OutputConfig`) or read with `load_recipe`, `inject_adapters`,
`save_adapter`, `load_adapter`, `merge_adapters`, `AdapterCheckpointCallback` (a transformers
Trainer that checkpoints the adapter alone), `write_starter` (`rlora init`), and the errors a
caller may catch: `UserError`, `TrainingDiverged`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "train": "rlora_cli.api",
    "TrainResult": "rlora_cli.api",
    "Recipe": "rlora_cli.config",
    "ModelConfig": "rlora_cli.config",
    "DataConfig": "rlora_cli.config",
    "DatasetConfig": "rlora_cli.config",
    "TrainConfig": "rlora_cli.config",
    "OutputConfig": "rlora_cli.config",
    "AdapterConfig": "rlora_cli.adapters",
    "inject_adapters": "rlora_cli.adapters",
    "merge_adapters": "rlora_cli.adapters",
    "save_adapter": "rlora_cli.checkpoint",
    "load_adapter": "rlora_cli.checkpoint",
    "load_recipe": "rlora_cli.recipe.load",
    "AdapterCheckpointCallback": "rlora_cli.callback",
    "write_starter": "rlora_cli.starter",
    "UserError": "rlora_cli.errors",
    "TrainingDiverged": "rlora_cli.training.loop",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'rlora_cli' has no attribute {name!r}")
