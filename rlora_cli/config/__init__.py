"""The recipe's typed sections, no I/O: one file per section, imported from here.

`recipe/load.py` reads the YAML, checks types and numbers no run can use (`recipe/typed.py`: nan,
inf, integers past 32 bits), and merges every section's problems into one report; each section
then checks its own values when built (`config/common.py`).
"""

from rlora_cli.config.common import FIX, choice, validate
from rlora_cli.config.data import (
    CHAT_ROLES,
    FORMATS,
    KIND_FIELDS,
    KINDS,
    TEMPLATE_NAMES,
    DataConfig,
    DatasetConfig,
)
from rlora_cli.config.model import ATTENTION, DTYPE_HELP, DTYPE_NAMES, DTYPES, ModelConfig, canonical_dtype
from rlora_cli.config.recipe import SEED_RANGE, Recipe, compile_problems
from rlora_cli.config.train import (
    ADAPTER_DTYPES,
    COMPILE_MODES,
    KERNELS,
    PRECISIONS,
    SCHEDULERS,
    TRACKERS,
    OutputConfig,
    TrainConfig,
)

__all__ = [
    "ADAPTER_DTYPES", "ATTENTION", "CHAT_ROLES", "COMPILE_MODES", "DTYPES", "DTYPE_HELP", "DTYPE_NAMES",
    "DataConfig", "DatasetConfig", "FIX", "FORMATS", "KERNELS", "KINDS", "KIND_FIELDS", "ModelConfig",
    "OutputConfig", "PRECISIONS", "Recipe", "SCHEDULERS", "SEED_RANGE", "TEMPLATE_NAMES", "TRACKERS",
    "TrainConfig", "canonical_dtype", "choice", "compile_problems", "validate",
]
