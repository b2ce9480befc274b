"""The `train:` and `output:` sections: the optimisation loop and what a run writes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlora_cli.config.common import choice, validate

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
KERNELS = ("auto", "liger", "fused", "none")
ADAPTER_DTYPES = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
SCHEDULERS = ("linear", "cosine", "constant")
# Accelerate's tracker names (`output.log_with`), plus none and all.
TRACKERS = ("none", "all", "tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive",
            "swanlab", "trackio")



@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimisation loop."""

    WHERE = "train"  # the YAML path its problems start with

    num_epochs: int = 1
    """Passes over the mixture (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = num_epochs over the mixture."""
    micro_batch_size: int = 8
    """Rows per device per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (effective batch = micro x accumulation x devices)."""
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    lr_scheduler: str = "cosine"
    """linear | cosine | constant, after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up linearly from 0."""
    warmup_steps: int = 0
    """Steps spent warming up linearly from 0; > 0 overrides warmup_ratio. Unlike the ratio it does
    not move with max_steps, so a constant-schedule run resumed with a larger max_steps continues
    as one planned that long from the start."""
    precision: str = "auto"
    """Compute precision: auto (bf16 where supported, else fp32) | bf16 | fp16 | fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    kernels: str = "auto"
    """auto | liger | fused | none: Liger's fused kernels on CUDA (auto = when installed); fused adds
    the adapters' Triton kernels (CUDA or Triton's CPU interpreter, eager: not inside train.compile's
    blocks)."""
    weight_decay: float = 0.0
    """AdamW weight decay; never applied to gates and routers."""
    max_grad_norm: float = field(default=1.0, metadata={"inf": True})
    """Clip the global gradient norm to this. 0 = no clipping (and no grad_norm in the logs);
    .inf = no clipping, but the norm is still computed and logged (nan is refused)."""
    compile: bool = False
    """torch.compile each decoder block in place (the whole model when it has no block list)."""
    compile_mode: str = "default"
    """torch.compile mode with compile: true: default | reduce-overhead (CUDA graphs: each compiled
    block's kernels replay as one launch; packed rows are padded to max_length, so it records
    once, or once more when varlen attention's segment list grows past a multiple of 64)
    | max-autotune-no-cudagraphs."""
    adapter_dtype: str = "auto"
    """Adapter weights: auto (fp32 over a half-precision base, as PEFT) | fp32 | bf16 (no casts
    under bf16 autocast, a little faster; the optimizer then updates bf16 weights)."""

    def __post_init__(self) -> None:
        validate(self)

    def problems(self, where: str) -> list[str]:
        counts = ("num_epochs", "micro_batch_size", "gradient_accumulation_steps")
        p = [f"{where}.{k}: must be >= 1, got {getattr(self, k)}" for k in counts if getattr(self, k) < 1]
        if self.max_steps == 0 or self.max_steps < -1:
            p.append(f"{where}.max_steps: must be > 0, or -1 for num_epochs, got {self.max_steps}")
        if not self.learning_rate > 0:
            p.append(f"{where}.learning_rate: must be > 0, got {self.learning_rate:g}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            p.append(f"{where}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio:g}")
        if self.warmup_steps < 0:
            p.append(f"{where}.warmup_steps: must be >= 0 (0 = use warmup_ratio), got {self.warmup_steps}")
        p += [f"{where}.{k}: must be >= 0, got {getattr(self, k):g}"
              for k in ("weight_decay", "max_grad_norm") if not getattr(self, k) >= 0]
        for key, allowed in (("lr_scheduler", SCHEDULERS), ("precision", PRECISIONS), ("kernels", KERNELS),
                             ("adapter_dtype", ADAPTER_DTYPES), ("compile_mode", COMPILE_MODES)):
            if getattr(self, key) not in allowed:
                p.append(choice(f"{where}.{key}", getattr(self, key), allowed))
        if self.compile and self.compile_mode == "reduce-overhead" and self.kernels == "liger":
            p.append(f"{where}.kernels: liger puts Liger's Triton RoPE/RMSNorm/SwiGLU inside the compiled "
                     "blocks, which breaks the CUDA graphs of compile_mode: reduce-overhead; "
                     "use kernels: auto (the fused loss only) or compile_mode: default")
        return p


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """What a run writes, and how often."""

    WHERE = "output"  # the YAML path its problems start with

    dir: str = ""
    """Run directory ('' = runs/<recipe file name>)."""
    save_steps: int = 500
    """Write a checkpoint every this many optimizer steps (0 = only at the end)."""
    save_minutes: float = 0.0
    """Also write a checkpoint once this many minutes have passed since the last one (0 = off);
    for preemptible machines, where a step count says little about lost time."""
    save_total_limit: int = 3
    """Checkpoints kept (oldest deleted first; 0 = keep all)."""
    logging_steps: int = 10
    """Log loss, learning rate and throughput every this many steps."""
    eval_steps: int = 0
    """Held-out loss per task every this many steps (0 = only at the end)."""
    log_with: str = "none"
    """none | tensorboard | wandb | any other Accelerate tracker name."""

    def __post_init__(self) -> None:
        validate(self)

    def problems(self, where: str) -> list[str]:
        p = [f"{where}.{k}: must be >= 0, got {getattr(self, k)}"
             for k in ("save_steps", "save_total_limit", "eval_steps") if getattr(self, k) < 0]
        if not (math.isfinite(self.save_minutes) and self.save_minutes >= 0):
            p.append(f"{where}.save_minutes: must be a finite number >= 0, got {self.save_minutes}")
        if self.logging_steps < 1:
            p.append(f"{where}.logging_steps: must be >= 1, got {self.logging_steps}")
        if self.log_with not in TRACKERS:
            p.append(choice(f"{where}.log_with", self.log_with, TRACKERS))
        return p


