"""The optimizer side of a run: precision, AdamW and its schedule, and what Accelerate's state holds.

    optimizer, scheduler = adamw(model, recipe.train, total, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    own_grads(model)            # only when compiled blocks replay as CUDA graphs
    state_hooks(accelerator)

Weight decay falls on the adapters' A/B factors only, never on gates and routers, which also take
their own learning rate (adapter.gate_lr_ratio, router_lr_ratio: the schedule scales every group
alike); the base model is frozen and never enters a checkpoint (the adapter is saved on its own).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import get_scheduler

from rlora_cli.errors import UserError


def mixed_precision(precision: str) -> str:
    """auto = bf16 where supported, else fp16 (with loss scaling) on GPU, fp32 on CPU."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not torch.cuda.is_available():  # bf16 autocast also runs on the CPU
        raise UserError("train.precision: fp16 needs a CUDA GPU", "use precision: auto or fp32 on the CPU")
    return {"fp32": "no"}.get(precision, precision)


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, *, gate_lr_ratio: float = 1.0,
                 router_lr_ratio: float = 1.0) -> list[dict[str, Any]]:
    """Two AdamW groups, always both (a checkpoint's optimizer state is matched group by group): the
    A/B factors with weight decay at `lr`, then the gates or routers (a method has one kind or
    neither) without weight decay, at their own ratio of `lr`."""
    factors, mixers, ratio = [], [], 1.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("rlora_gate"):
            mixers.append(p)
            ratio = gate_lr_ratio
        elif name.endswith("rlora_router"):
            mixers.append(p)
            ratio = router_lr_ratio
        else:
            factors.append(p)
    return [{"params": factors, "weight_decay": weight_decay, "lr": lr},
            {"params": mixers, "weight_decay": 0.0, "lr": lr * ratio}]


def adamw(model: torch.nn.Module, train: Any, total: int, *, fused: bool,
          adapter: Any = None) -> tuple[torch.optim.AdamW, Any]:
    """AdamW over the trainable parameters and the recipe's learning-rate schedule over `total` steps;
    `adapter` (the AdapterConfig) gives the gates' and routers' learning-rate ratios."""
    ratios = {} if adapter is None else {"gate_lr_ratio": adapter.gate_lr_ratio,
                                         "router_lr_ratio": adapter.router_lr_ratio}
    groups = param_groups(model, train.weight_decay, train.learning_rate, **ratios)
    optimizer = torch.optim.AdamW(groups, lr=train.learning_rate, fused=fused)
    name = train.lr_scheduler if train.lr_scheduler != "constant" else "constant_with_warmup"
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(train, total),
                              num_training_steps=total)
    return optimizer, scheduler


def warmup_steps(train: Any, total: int) -> int:
    """train.warmup_steps when set, else warmup_ratio of the run's `total` steps (rounded up)."""
    return train.warmup_steps if train.warmup_steps > 0 else math.ceil(train.warmup_ratio * total)


def own_grads(model: torch.nn.Module) -> None:
    """Give every trainable parameter a .grad of its own, for compiled blocks that replay as CUDA
    graphs. The backward's gradients are CUDA-graph outputs, which the next replay overwrites; a
    .grad of None would take that buffer over. Own .grad tensors, which every backward adds into
    (gradient accumulation), stay valid: the loop zeroes them, never sets them to None."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)


def state_hooks(accelerator: Any) -> None:
    """Keep the frozen base out of Accelerate's state: the adapter is saved on its own."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return  # FSDP saves sharded model state itself; the hooks do not apply to it

    def drop_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def skip_models(models: list, input_dir: str) -> None:
        models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(skip_models)
