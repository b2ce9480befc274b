"""What softmax routers do while training: router entropy, per-task head usage, and the
task-balancing mutual-information loss.

    probe = install_probe(model, n_tasks=2, aux_weight=0.01)  # after injection, before compile/DDP
    probe.start(task_ids, input_ids)  # each training micro-batch: ids [B, S] or [B], -1 = padding
    losses = model(...)               # each routed MultiHeadLoRA hands its ω [T, n] to probe.observe
    aux = probe.stop()                # −weight · mean over routed modules of I(T;E); None at weight 0
    probe.stats                       # [tasks, n + 2]: Σ ω per head | Σ H(ω) | tokens, over modules
    probe.reset()

Telemetry: for every non-padding token t of a training forward, each routed module adds ω_t,
H(ω_t) = −Σ_e ω_t(e) log ω_t(e) (nats) and 1 to its task's row of `stats`: detached, in place, on
the device (no host sync), four small kernels per module in eager mode. Nothing is recorded in
eval mode, under no_grad, or by a layer whose `fixed_mixture` replaces its router.

The auxiliary loss (Z. Chen et al., "Mod-Squad: Designing Mixtures of Experts As Modular
Multi-Task Learners", CVPR 2023, arXiv:2212.08066: a mutual-information loss between tasks and
experts) rewards routing that depends on the task, per routed module over the micro-batch's
non-padding tokens:

    P(e|t) = mean over task t's tokens of ω_t(e),   P(t) = task t's share of the tokens,
    P(t,e) = P(t)·P(e|t),   P(e) = Σ_t P(t,e),
    I(T;E) = Σ_{t,e} P(t,e) log(P(t,e) / (P(t) P(e))) = H(P(e)) − Σ_t P(t) H(P(·|t)).

High I wants every task to concentrate on its own heads (low H(P(·|t))) while all heads stay in
use (high H(P(e))). Switch Transformer's load-balancing loss (Fedus et al., JMLR 2022) asks only
for the second: it pushes a soft router toward uniform weights, which is where our routers
already sit and what we are trying to leave, hence MI. A micro-batch that holds one task gives
I = 0 exactly (P(e|t) = P(e)): no signal, so the loss needs micro-batches that mix tasks. I is at
its minimum (0) wherever routing ignores the task, so its gradient there is zero: from R-LoRA's
zero router (ω ≡ 1/n) it acts only once the LM loss has moved the router, and then it amplifies
the task-dependent part of that move.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .inject import adapter_layers

EPS = 1e-12  # clamps the logs of probabilities that are zero (a task absent from the micro-batch)


class RouteProbe:
    """Shared by every routed layer of one model (`layer.route_probe`); see the module docstring."""

    def __init__(self, layers: list[nn.Module], n_tasks: int, *, aux_weight: float = 0.0,
                 device: Any = None) -> None:
        self.n_tasks, self.aux_weight = n_tasks, float(aux_weight)
        self.terms: list[Tensor] = []  # this forward's I(T;E) of each routed module (weight > 0)
        self.n_heads = layers[0].spec.num_heads
        device = device if device is not None else layers[0].rlora_A.device
        # One row per task and a last one that padding tokens land in, never read: no token is
        # masked out, which keeps a routed layer's share to four small kernels (eager).
        self.sums = torch.zeros(n_tasks + 1, self.n_heads + 2, dtype=torch.float64, device=device)
        # Zeroed in place, never replaced: compiled blocks that replay as CUDA graphs may then
        # update it inside the graph instead of falling back to eager for a mutated input.
        torch._dynamo.mark_static_address(self.sums)
        self.recording = False
        self.index: Tensor | None = None   # [T] each token's task; padding: n_tasks
        self.ones: Tensor | None = None    # [T, 1] float64: the token-count column
        self.counts: Tensor | None = None  # [tasks + 1] float64: tokens per task (padding last)

    @property
    def stats(self) -> Tensor:
        """[tasks, n + 2] float64 sums over the routed modules and tokens since the last reset:
        Σ ω per head | Σ H(ω) in nats | tokens."""
        return self.sums[:-1]

    def start(self, task_ids: Tensor, input_ids: Tensor) -> None:
        """Before a training forward: the micro-batch's task ids, [B, S] per token or [B] per row
        of `input_ids` [B, S] (on the model's device; -1 = padding; a row's id covers all of it)."""
        tasks = (task_ids if task_ids.dim() == 2 else task_ids[:, None].expand_as(input_ids)).reshape(-1)
        self.index = torch.where(tasks >= 0, tasks, self.n_tasks)
        self.ones = torch.ones(tasks.shape[0], 1, dtype=torch.float64, device=tasks.device)
        self.counts = self.sums.new_zeros(self.n_tasks + 1).index_add_(0, self.index, self.ones[:, 0])
        self.recording = True

    def stop(self) -> Tensor | None:
        """After the forward: −weight · mean over routed modules of I(T;E), with its graph (None
        at weight 0). Recording stops, so a recomputation in backward (gradient checkpointing)
        adds nothing; the task ids stay for it."""
        self.recording = False
        found, self.terms = self.terms, []
        if not found:
            return None
        return -self.aux_weight * torch.stack(found).mean()

    def reset(self) -> None:
        self.sums.zero_()

    def observe(self, layer: nn.Module, weights: Tensor) -> None:
        """Called by a routed layer's forward with its ω [T, n] (T: the micro-batch's tokens)."""
        if not (layer.training and torch.is_grad_enabled()) or self.index is None:
            return  # eval and no_grad forwards record nothing
        if weights.shape[0] != self.index.shape[0]:
            return  # a module that does not see the micro-batch's tokens one by one
        if self.recording:
            with torch.no_grad():
                self.sums.index_add_(0, self.index, token_rows(weights, self.ones))
        # Computed while recomputing too (gradient checkpointing): the recomputed forward must save
        # the same tensors for backward as the first one did.
        if self.aux_weight > 0:
            mi = mutual_information(weights, self.index, self.counts)
            if self.recording:
                self.terms.append(mi)


def token_rows(weights: Tensor, ones: Tensor) -> Tensor:
    """[T, n + 2] float64: ω_t | H(ω_t) | 1 for each token (detached); `ones` [T, 1] float64."""
    w = weights.detach()
    return torch.cat([w, torch.special.entr(w).sum(-1, keepdim=True), ones], 1)  # entr(0) = 0


def mutual_information(weights: Tensor, index: Tensor, counts: Tensor) -> Tensor:
    """I(T;E) in nats of ω [T, n] over the non-padding tokens, in ω's dtype, differentiable in ω.
    `index` [T]: each token's task, padding's = the number of tasks; `counts` [tasks + 1]: tokens
    per index (float)."""
    total = counts[:-1].sum().clamp_min(1.0)
    joint = weights.new_zeros(counts.shape[0], weights.shape[1]).index_add(0, index, weights)[:-1]
    joint = joint / total.to(weights.dtype)  # P(t,e)
    p_task = (counts[:-1] / total).to(weights.dtype)
    p_head = joint.sum(0)
    log_ratio = (joint.clamp_min(EPS).log() - p_task.clamp_min(EPS).log()[:, None]
                 - p_head.clamp_min(EPS).log()[None, :])
    return (joint * log_ratio).sum()


def install_probe(model: nn.Module, n_tasks: int, *, aux_weight: float = 0.0,
                  device: Any = None) -> RouteProbe | None:
    """One RouteProbe shared by the model's softmax-routed layers (None when it has none).
    `device`: where the model will train (the probe's sums live there)."""
    layers = [m for m in adapter_layers(model).values() if m.spec.gate == "router"]
    if not layers:
        return None
    probe = RouteProbe(layers, n_tasks, aux_weight=aux_weight, device=device)
    for layer in layers:
        layer.route_probe = probe
    return probe
