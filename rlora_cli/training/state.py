"""Where a run stands, and what makes resuming it exact.

    state = restore(checkpoint, accelerator, model, total)   # adapter, optimizer, schedule, counters
    loader.sampler.epoch, loader.sampler.start = state.epoch, state.batch_in_epoch * micro_batch_size

- `TrainerState`: the step counters each checkpoint saves (trainer_state.json).
- `EpochSampler`: each process reads its own rank-strided share of a per-epoch permutation seeded
  by the recipe's seed, so resuming is an index skip: no batch is read to be thrown away.
- `train_loader`: the DataLoader over that sampler, with its own generator, so iterating it never
  shifts the global RNG that dropout draws from.
- `rng_snapshot` / `rng_restore`: the RNG state at a step boundary; an interrupted step's dropout
  draws are undone before its checkpoint, so the resumed run continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from rlora_cli.checkpoint import load_adapter_weights
from rlora_cli.data.packing import collate
from rlora_cli.errors import UserError
from rlora_cli.runs import STATE_FILE


@dataclass
class TrainerState:
    step: int = 0            # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch consumed by completed steps
    tokens: int = 0          # trained (label) tokens seen, all processes
    total_steps: int = 0
    processes: int | None = None  # that trained it (None: a checkpoint older than this field)

    @classmethod
    def read(cls, checkpoint: Path, total: int) -> "TrainerState":
        """The counters `checkpoint` saved; the step budget is this run's (it may have changed)."""
        return cls(**{**json.loads((checkpoint / STATE_FILE).read_text()), "total_steps": total})


def restore(checkpoint: Path, accelerator: Any, model: Any, total: int) -> TrainerState:
    """Load a checkpoint into the prepared model and Accelerate's state (optimizer, schedule);
    returns its counters."""
    state = TrainerState.read(checkpoint, total)
    if state.processes not in (None, accelerator.num_processes):
        # Each process counts its own place in the epoch: another count would skip or repeat rows.
        raise UserError(f"{checkpoint} was written by {state.processes} process(es), and this run has "
                        f"{accelerator.num_processes}",
                        f"resume with the same number (accelerate launch --num_processes {state.processes}), "
                        "or start over with --overwrite")
    load_adapter_weights(accelerator.unwrap_model(model), checkpoint / "adapter")
    accelerator.load_state(str(checkpoint / "state"))
    return dataclasses.replace(state, processes=accelerator.num_processes)


def schedule(n_rows: int, world: int, train: Any) -> tuple[int, int, int]:
    """(micro-batches per epoch per process, optimizer steps per epoch, total steps)."""
    micro_per_epoch = math.ceil(math.ceil(n_rows / world) / train.micro_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / train.gradient_accumulation_steps)
    total = train.max_steps if train.max_steps > 0 else train.num_epochs * steps_per_epoch
    return micro_per_epoch, steps_per_epoch, total


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a permutation seeded by (seed, epoch), from a start position.

    The permutation is padded by wrapping around to a multiple of the world size, so every
    process takes the same number of steps.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.world) - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: (-len(order)) % self.world]
        return iter(order[self.rank::self.world][self.start:])


def train_loader(rows: Any, recipe: Any, pad_id: int, *, rank: int, world: int, pin_memory: bool,
                 cu_seq_lens: bool) -> torch.utils.data.DataLoader:
    """Micro-batches of this process's share of `rows`, collated for the model; its `sampler` is
    the EpochSampler to position before each epoch."""
    packing = recipe.data.packing
    # Compiled blocks want few distinct shapes: packed rows are padded to max_length (one static
    # shape), unpacked ones to a multiple of 64.
    pad_to = (recipe.data.max_length if packing else 64) if recipe.train.compile else None
    sampler = EpochSampler(len(rows), recipe.seed, rank, world)
    return torch.utils.data.DataLoader(
        rows, batch_size=recipe.train.micro_batch_size, sampler=sampler,
        # Its own generator: iter(DataLoader) draws a worker seed, which must not shift the
        # global RNG that dropout uses (a resumed run calls iter() at a different point).
        generator=torch.Generator(),
        pin_memory=pin_memory,  # so the copy to the GPU need not wait for it
        collate_fn=lambda batch: collate(batch, pad_id=pad_id, packing=packing, pad_to_multiple_of=pad_to,
                                         cu_seq_lens=cu_seq_lens))


def rng_snapshot() -> dict[str, Any]:
    """Every RNG a step draws from: Python's, NumPy's, torch's CPU and CUDA generators."""
    snap = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def rng_restore(snap: dict[str, Any]) -> None:
    random.setstate(snap["python"])
    np.random.set_state(snap["numpy"])
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap:
        torch.cuda.set_rng_state_all(snap["cuda"])
