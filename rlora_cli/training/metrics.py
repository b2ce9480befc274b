"""What a run records as it goes: the log window behind each line of OUT/metrics.jsonl, the file
itself, the held-out loss, OUT/run_info.json and the settings handed to experiment trackers.

    window.add(token_loss, batch); window.add_step(loss_sum, tokens)   # each micro-batch, step
    row = window.maybe_log(state, accelerator, scheduler, grad_norm, tasks)
    log.write(row)                                                     # main process only

With a softmax router (adapters/probe.py) a line also has `router_entropy` (mean H(ω) in nats over
the routed modules and the window's non-padding tokens), `task_router_usage` ({task: [mean ω per
head]} over the modules and the task's tokens) and, with adapter.router_aux_weight > 0,
`router_aux`: the window's auxiliary loss per label token, as `loss` is the LM loss per label
token, so the objective trained is loss + router_aux.

Rendering them (the progress line, the plots) is report/train.py's.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable

import accelerate
import torch
import transformers

from rlora_cli import __version__
from rlora_cli.adapters.probe import RouteProbe
from rlora_cli.data.packing import IGNORE, collate
from rlora_cli.files import atomic_write_text
from rlora_cli.recipe.load import flatten
from rlora_cli.runs import read_metrics
from rlora_cli.training.kernels import Kernels
from rlora_cli.training.loss import token_losses
from rlora_cli.training.state import TrainerState


class MetricsLog:
    """Appends one JSON object per logged step to OUT/metrics.jsonl (kept across resumes)."""

    def __init__(self, path: Path, *, resume_step: int = 0) -> None:
        self.path = path
        if path.exists():  # on resume, drop rows past the checkpoint we restart from
            rows = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            # Through a temporary file: a full disk must not leave the log cut short.
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """Every row written so far, this run's and those kept from before a resume."""
        return read_metrics(self.path) if self.path.exists() else []


class LogWindow:
    """What a log line reports: the loss over the steps since the last line, per-task loss sums,
    token throughput and, with a `probe`, what the routers did (its sums are reset with the window)."""

    def __init__(self, n_tasks: int, device: Any, every: int, probe: RouteProbe | None = None) -> None:
        self.n_tasks, self.device, self.every, self.probe = n_tasks, device, max(every, 1), probe
        self.reset()

    def reset(self) -> None:
        # Kept on the device: adding a micro-batch must not wait for the GPU (no host sync).
        self.loss = torch.zeros(self.n_tasks, dtype=torch.float64, device=self.device)
        self.count = torch.zeros(self.n_tasks, dtype=torch.float64, device=self.device)
        if self.probe is not None:  # Σ aux · label tokens, and the routers' sums
            self.aux = torch.zeros(1, dtype=torch.float64, device=self.device)
            self.probe.reset()
        self.step_loss = self.step_tokens = 0.0  # global sums, as LossReads reads them back
        self.inputs = 0  # this process's non-padding input tokens, counted on the host
        self.started = time.perf_counter()

    def logs_at(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def add_inputs(self, batch: dict[str, torch.Tensor]) -> None:
        self.inputs += int((batch["task_ids"] != -1).sum())  # a CPU tensor still: no sync

    def add(self, token_loss: torch.Tensor, batch: dict[str, torch.Tensor],
            aux: torch.Tensor | None = None) -> None:
        """A micro-batch's token losses and, with the router loss on, its aux · label tokens
        (loss.with_router_aux)."""
        # Every token added, unlabelled ones with weight 0: selecting the labelled ones
        # (token_loss[mask]) would wait for the GPU to count them.
        mask = (batch["labels"][:, 1:] != IGNORE).flatten()
        tasks = _token_tasks(batch)[:, 1:].flatten().clamp_min(0)  # padding's task -1 -> 0, weight 0
        self.loss.index_add_(0, tasks, torch.where(mask, token_loss.flatten().double(), 0.0))
        self.count.index_add_(0, tasks, mask.double())
        if aux is not None:
            self.aux += aux.detach().double()

    def add_step(self, loss_sum: float, tokens: float) -> None:
        self.step_loss += loss_sum
        self.step_tokens += tokens

    def maybe_log(self, state: TrainerState, accelerator: Any, scheduler: Any, grad_norm: Any,
                  tasks: list[str]) -> dict[str, Any] | None:
        """The log line due at this step (then the window starts over), or None."""
        if not self.logs_at(state.step, state.total_steps):
            return None
        inputs = torch.tensor([float(self.inputs)], dtype=torch.float64, device=self.device)
        routes = [] if self.probe is None else [self.probe.stats.flatten(), self.aux]
        # One all-reduce for every sum of the window, the routers' included.
        both = accelerator.reduce(torch.cat([self.loss, self.count, *routes, inputs]), reduction="sum").cpu()
        loss, count, n = both[:self.n_tasks], both[self.n_tasks:2 * self.n_tasks], float(both[-1])
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        row = {
            "step": state.step, "epoch": state.epoch,
            "loss": self.step_loss / max(self.step_tokens, 1.0),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": state.tokens,
            "tokens_per_s": self.step_tokens / elapsed,
            "input_tokens_per_s": n / elapsed,
            "task_loss": {tasks[i]: float(loss[i] / count[i]) for i in range(len(tasks)) if count[i] > 0},
        }
        if self.probe is not None:
            row.update(router_fields(both[2 * self.n_tasks:-1], self.probe, tasks, self.step_tokens))
        self.reset()
        return row


def router_fields(values: torch.Tensor, probe: RouteProbe, tasks: list[str], label_tokens: float
                  ) -> dict[str, Any]:
    """router_entropy, task_router_usage (and router_aux) from the reduced [probe.stats | Σ aux]."""
    stats = values[:-1].view(len(tasks), probe.n_heads + 2)
    usage, entropy, count = stats[:, :-2], stats[:, -2], stats[:, -1]
    row: dict[str, Any] = {}
    if count.sum() > 0:
        row["router_entropy"] = float(entropy.sum() / count.sum())
        row["task_router_usage"] = {tasks[i]: (usage[i] / count[i]).tolist()
                                    for i in range(len(tasks)) if count[i] > 0}
    if probe.aux_weight > 0:
        row["router_aux"] = float(values[-1]) / max(label_tokens, 1.0)
    return row


def _token_tasks(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    tasks = batch["task_ids"]
    return tasks if tasks.dim() == 2 else tasks[:, None].expand_as(batch["input_ids"])


@torch.no_grad()
def evaluate_loss(model: Any, data: Any, accelerator: Any, pad_id: int, recipe: Any,
                  kern: Kernels = Kernels("none"), losses: Callable[..., torch.Tensor] = token_losses
                  ) -> dict[str, float]:
    """Held-out loss per task: each process scores its share, sums are reduced; `kern` is what
    `apply_kernels` did to the model (the loss and attention it expects). `losses`: the per-token
    loss; the training loop passes the one its steps call, so one function scores both."""
    model.eval()
    world, rank, bs = accelerator.num_processes, accelerator.process_index, recipe.train.micro_batch_size
    result = {}
    for task, dataset in data.val.items():
        rows = list(range(rank, len(dataset), world))
        n_batches = math.ceil(math.ceil(len(dataset) / world) / bs)  # equal on every process
        sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for b in range(n_batches):
            idx = rows[b * bs:(b + 1) * bs]
            weight = 1.0 if idx else 0.0  # a process with no rows left runs a dummy batch
            batch = collate([dataset[i] for i in (idx or [0])], pad_id=pad_id, packing=False,
                            cu_seq_lens=kern.packed_attention)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            # Compiled blocks run eagerly here: held-out rows come in many lengths, each of which
            # would compile (and under reduce-overhead record CUDA graphs) for a few batches.
            with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
                loss = losses(model, batch, fused=kern.fused_loss)
            mask = batch["labels"][:, 1:] != IGNORE
            sums += weight * torch.stack([loss[mask].double().sum(), mask.sum().double()])
        sums = accelerator.reduce(sums, reduction="sum")
        if sums[1] > 0:
            result[task] = float(sums[0] / sums[1])
    model.train()
    return result


def run_info(recipe: Any, accelerator: Any, trainable: int, total: int) -> dict[str, Any]:
    """OUT/run_info.json: versions, device, precision and sizes, for reproducing a run."""
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "rlora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "python": platform.python_version(),
        "seed": recipe.seed, "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "device_name": device_name,
        "precision": accelerator.mixed_precision, "distributed": str(accelerator.distributed_type),
        "trainable_parameters": trainable, "total_parameters": total,
    }


def tracker_config(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's scalar settings under dotted keys (data.datasets[0].weight), as experiment
    trackers take hyperparameters. (recipe/load.py's flattener, which recipe diffs use too.)"""
    return {k: v for k, v in flatten(recipe).items() if isinstance(v, (int, float, str, bool))}
