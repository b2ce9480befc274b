"""The whole recipe: its sections together, and what they forbid together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlora_cli.config.common import validate
from rlora_cli.config.data import DataConfig
from rlora_cli.config.model import ModelConfig
from rlora_cli.config.train import OutputConfig, TrainConfig

if TYPE_CHECKING:  # only for the annotation: importing adapters/ would load torch with every config import
    from rlora_cli.adapters.methods import AdapterConfig

# numpy (and accelerate's set_seed, which seeds numpy) accepts seeds in [0, 2**32-1].
SEED_RANGE = (0, 2**32 - 1)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A whole training run: base model, adapter, data mixture, loop and outputs."""

    WHERE = ""  # the YAML path its problems start with

    seed: int = 0
    """Seeds the adapter init, the held-out splits, the mixture draw and the data order; an integer
    from 0 to 2**32-1 (what numpy accepts)."""
    model: ModelConfig
    """The frozen base model."""
    adapter: AdapterConfig
    """The adapter; starts from configs/adapters/<type>.yaml and the keys given override it (the
    loader builds it, so it has no default here)."""
    data: DataConfig
    """The multi-task data mixture."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Outputs and their frequency."""

    def __post_init__(self) -> None:
        validate(self)

    def problems(self, where: str) -> list[str]:
        lo, hi = SEED_RANGE
        seed = [] if lo <= self.seed <= hi else [
            f"seed: {self.seed} is out of range; give an integer from {lo} to {hi}"]
        return seed + compile_problems(self.train, self.data)


def compile_problems(train: TrainConfig, data: DataConfig) -> list[str]:
    """What train and data forbid together: CUDA graphs replay one recorded shape, and unpacked rows
    vary in length and carry a padding mask, whose attention path breaks the compiled block (and
    graph outputs get overwritten)."""
    if train.compile and train.compile_mode == "reduce-overhead" and not data.packing:
        return ["train.compile_mode: reduce-overhead needs data.packing: true (packed rows are padded "
                "to max_length: fixed shapes, which CUDA graphs replay); "
                "use compile_mode: default for unpacked data"]
    return []


