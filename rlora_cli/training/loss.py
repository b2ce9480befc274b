"""The loss of a training step, and reading it back without stalling the GPU.

    n = label_tokens(micro, accelerator)                  # before the first backward
    total = token_losses(model, batch).sum()
    objective, aux_sum = with_router_aux(total, probe.stop(), batch)   # + a router loss, if any
    accelerator.backward(objective * world / n)
    finished = reads.push(step_values(accelerator, step_loss, n, vote), step)

The loss of an optimizer step is the sum of token losses over every micro-batch of the step and
every process, divided by the number of label tokens in all of them. A per-batch mean is wrong
under prompt masking (batches hold different numbers of trained tokens), so the step's tokens are
counted before its first backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlora_cli.data.packing import IGNORE

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "rlora_cu_seq_lens")


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                 fused: bool = False) -> torch.Tensor:
    """Cross-entropy of every next-token prediction [B, T-1] in float32 (float64 for a float64
    model), 0 where unlabelled.
    `fused`: the model has kernels.install_fused_loss's forward, which never builds the logits."""
    inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
    if fused:
        return model(**inputs, use_cache=False, rlora_labels=batch["labels"])
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="none")
    return loss.view(labels.shape)


def with_router_aux(total_loss: torch.Tensor, aux: torch.Tensor | None,
                    batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the micro-batch's objective, its router term detached, or None): Σ token loss, plus the
    router's auxiliary loss (adapters/probe.py) counted once per label token of the micro-batch.

    So the aux term takes the LM loss's normalisation unchanged: the step divides the sum over its
    micro-batches and processes by its label tokens, and the step's aux is the mean of the
    micro-batches' auxes weighted by their label tokens (each aux is over its micro-batch's
    non-padding tokens, prompts included). Counted on the device: no host sync. Without a
    router loss the objective is `total_loss` itself."""
    if aux is None:
        return total_loss, None
    term = aux * (batch["labels"][:, 1:] != IGNORE).sum()
    return total_loss + term, term.detach()


def label_tokens(micro: list[dict[str, torch.Tensor]], accelerator: Any) -> torch.Tensor:
    """Trained tokens in this step's micro-batches, summed over processes (≥ 1)."""
    n = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)  # the batches are on the host still
    # Filled on the device: a host->GPU copy of a pageable tensor would wait for all queued GPU work.
    total = accelerator.reduce(torch.full((), float(n), device=accelerator.device), reduction="sum")
    return total.clamp_min(1.0)


def step_values(accelerator: Any, step_loss: torch.Tensor, n_tokens: torch.Tensor,
                vote: float | None) -> torch.Tensor:
    """[Σ loss over all processes, label tokens], and with output.save_minutes (`vote` not None)
    the processes' votes to save, summed in the same collective: no extra sync."""
    if vote is None:
        return torch.stack([accelerator.reduce(step_loss, reduction="sum"), n_tokens])
    loss_sum, votes = accelerator.reduce(torch.stack([step_loss, step_loss.new_full((), vote)]),
                                         reduction="sum")
    return torch.stack([loss_sum, n_tokens, votes.to(n_tokens.dtype)])


class LossReads:
    """Each step's [Σ loss, label tokens], read on the host without stalling the GPU where safe.

    Reading a GPU value waits for all queued work, and the host's work after the read (clipping,
    the optimizer, the next step's set-up) then runs while the GPU idles (measured in
    benchmarks/RESULTS.md, "Third pass"). With a fused optimizer (`defer`) the values are copied
    to pinned memory behind an event and read one step later, once the next step's forward and
    backward are queued. The update of a step whose loss is not finite is skipped on the device
    meanwhile: the fused optimizer's `found_inf`, the flag the fp16 grad scaler uses. `optimizer`
    is the torch optimizer itself, not Accelerate's wrapper, which would hide the flag."""

    def __init__(self, optimizer: torch.optim.Optimizer, defer: bool) -> None:
        self.optimizer, self.defer = optimizer, defer
        self.pending: list[tuple[int, torch.Tensor, Any]] = []

    def push(self, values: torch.Tensor, step: int) -> list[tuple[int, float, float]]:
        """Queue `step`'s values; return the finished steps that can be read now: this one, or
        (deferred) the one before."""
        if not self.defer:
            return [(step, *values.tolist())]
        self.optimizer.found_inf = (~torch.isfinite(values[0])).float()
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event() if values.is_cuda else None
        if event is not None:
            event.record()
        ready, self.pending = self.pending, [(step, host, event)]
        return [self._read(p) for p in ready]

    def flush(self) -> list[tuple[int, float, float]]:
        ready, self.pending = self.pending, []
        return [self._read(p) for p in ready]

    @staticmethod
    def _read(pending: tuple[int, torch.Tensor, Any]) -> tuple[int, float, float]:
        step, host, event = pending
        if event is not None:
            event.synchronize()  # that step's copy only, not the work queued after it
        return (step, *host.tolist())
