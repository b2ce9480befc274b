"""The four methods as presets of one layer spec.

`AdapterConfig` is the `adapter:` section of a recipe (PEFT's key names); `layer_spec` turns it
into the `LayerSpec` that `MultiHeadLoRA` runs. Nothing here knows about files or YAML: the
paper defaults per method live in `configs/adapters/<method>.yaml` and are applied by the recipe
loader before an `AdapterConfig` is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from rlora_cli.errors import UserError, collect

from .layer import LayerSpec

METHODS = ("lora", "multilora", "hydralora", "rlora")
ROUTER_METHODS = ("hydralora", "rlora")

# R-LoRA's Multi-Head Random Init divides by sqrt(gamma); the paper and its code use gamma = 64.
RLORA_GAMMA = 64.0


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapter to inject and how. Field names follow PEFT's `LoraConfig` where one exists."""

    type: str = "rlora"
    """Method: lora | multilora | hydralora | rlora."""
    r: int = 8
    """Rank of each low-rank factor (per head; MultiLoRA: per parallel module)."""
    num_heads: int | None = None
    """B heads (hydralora/rlora) or parallel modules (multilora); lora has exactly 1 (default 3)."""
    lora_alpha: float = 32.0
    """Scaling numerator: s = lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.1
    """Dropout probability: on the input x, or per head in rank space when head_dropout is on."""
    use_rslora: bool = False
    """Rank-stabilised scaling s = lora_alpha / sqrt(r)."""
    target_modules: tuple[str, ...] | str = ("gate_proj", "up_proj", "down_proj")
    """Module names (matched on the name's last parts), one regex string, or 'all-linear'."""
    router: str | None = None
    """hydralora/rlora: softmax (token-wise router) | off (uniform 1/n: exactly mergeable)."""
    init: str | None = None
    """rlora (and hydralora with random_init): paper | reference (the released code's scaling)."""
    random_init: bool | None = None
    """Heads start random and compensated (rlora: on; hydralora: off). Ablation switch."""
    head_dropout: bool | None = None
    """Independent dropout masks per head on A·x instead of one mask on x (rlora: on)."""
    gate_lr_ratio: float | None = None
    """multilora: the scalar gates' learning rate over train.learning_rate (in the spirit of
    LoRA+'s separate rate for B); default 10 for multilora, else 1. Zero-init gates see a gradient
    of size |B_i·A_i·x| only, so at the adapters' rate they barely move in a short run (the
    default comes from a sweep of 1, 10, 30, 100 on the demo recipe: benchmarks/MTL.md)."""
    router_lr_ratio: float = 1.0
    """hydralora/rlora with router: softmax: the router's learning rate over train.learning_rate.
    A zero-init router starts uniform and its gradient is the heads' differences, small at first."""
    router_aux_weight: float = 0.0
    """hydralora/rlora with router: softmax: weight of the task-balancing router loss, the negative
    mutual information between task and head (Mod-Squad, Chen et al. 2023; adapters/probe.py),
    added to the training loss. 0 (the default) leaves training exactly as without it."""

    def __post_init__(self) -> None:
        tm = self.target_modules
        if isinstance(tm, list):
            object.__setattr__(self, "target_modules", tuple(tm))
        defaults = {
            "num_heads": 1 if self.type == "lora" else 3,
            "router": "softmax" if self.type in ROUTER_METHODS else None,
            "init": "paper" if self.type in ROUTER_METHODS else None,
            "random_init": self.type == "rlora",
            "head_dropout": self.type == "rlora",
            "gate_lr_ratio": 10.0 if self.type == "multilora" else 1.0,
        }
        for key, value in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        collect(self.problems(), "fix the adapter section (see configs/adapters/ for each method's defaults)")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def has_router(self) -> bool:
        return self.type in ROUTER_METHODS and self.router == "softmax"

    @property
    def mergeable(self) -> bool:
        """True when ΔW does not depend on the input (no softmax router)."""
        return not self.has_router

    def problems(self) -> list[str]:
        """Every problem with this config, each naming its key (empty when valid)."""
        p: list[str] = []
        if self.type not in METHODS:
            p.append(f"adapter.type: unknown method {self.type!r}; choose one of {', '.join(METHODS)}")
            return p
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            p.append(f"adapter.r: must be a positive integer, got {self.r!r}")
        if not isinstance(self.num_heads, int) or isinstance(self.num_heads, bool) or self.num_heads < 1:
            p.append(f"adapter.num_heads: must be an integer >= 1, got {self.num_heads!r}")
        elif self.type == "lora" and self.num_heads != 1:
            p.append(f"adapter.num_heads: lora has one head, got {self.num_heads}; "
                     "use multilora, hydralora or rlora for several")
        alpha = self.lora_alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            p.append(f"adapter.lora_alpha: must be a number > 0, got {self.lora_alpha!r}")
        d = self.lora_dropout
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0.0 <= d < 1.0:
            p.append(f"adapter.lora_dropout: must be in [0, 1), got {d!r}")
        if not isinstance(self.target_modules, (tuple, str)) or not self.target_modules:
            p.append("adapter.target_modules: give module names, a regex string, or 'all-linear'")
        if self.type in ROUTER_METHODS:
            if self.router not in ("softmax", "off"):
                p.append(f"adapter.router: must be softmax or off, got {self.router!r}")
            if self.init not in ("paper", "reference"):
                p.append(f"adapter.init: must be paper or reference, got {self.init!r}")
        else:
            for key in ("router", "init"):
                if getattr(self, key) is not None:
                    p.append(f"adapter.{key}: only hydralora and rlora have it; remove it for {self.type}")
            for key in ("random_init", "head_dropout"):
                if getattr(self, key):
                    p.append(f"adapter.{key}: only hydralora and rlora have it; remove it for {self.type}")
        return p + self._ratio_problems()

    def _ratio_problems(self) -> list[str]:
        p = []
        owners = (("gate_lr_ratio", "multilora (the method with scalar gates)", self.type == "multilora"),
                  ("router_lr_ratio", "hydralora and rlora with router: softmax", self.has_router))
        for key, owner, has in owners:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                p.append(f"adapter.{key}: must be a finite number > 0, got {value!r}")
            elif value != 1.0 and not has:
                p.append(f"adapter.{key}: applies to {owner} only; remove it for this {self.type} adapter")
        w = self.router_aux_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w < math.inf:
            p.append(f"adapter.router_aux_weight: must be a finite number >= 0, got {w!r}")
        elif w > 0 and not self.has_router:
            p.append("adapter.router_aux_weight: the router loss needs a softmax router; set it to 0, "
                     "or use hydralora or rlora with router: softmax")
        return p

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"adapter: unknown key(s) {', '.join(unknown)}",
                            f"known keys are {', '.join(sorted(names))}")
        return cls(**d)


def layer_spec(cfg: AdapterConfig) -> LayerSpec:
    """The layer computation a method asks for: which knobs of the one fused layer it turns."""
    p = float(cfg.lora_dropout)
    if cfg.type == "lora":
        return LayerSpec(r=cfg.r, num_heads=1, scaling=cfg.scaling, shared_a=True, gate="none",
                         input_dropout=p, head_dropout=0.0, init="lora", compensate=False)
    if cfg.type == "multilora":
        return LayerSpec(r=cfg.r, num_heads=cfg.num_heads, scaling=cfg.scaling, shared_a=False,
                         gate="scalar", input_dropout=p, head_dropout=0.0, init="multilora",
                         compensate=False)
    random = bool(cfg.random_init)
    init = ("reference" if cfg.init == "reference" else "random") if random else "hydralora"
    return LayerSpec(
        r=cfg.r, num_heads=cfg.num_heads, scaling=cfg.scaling, shared_a=True,
        gate="router" if cfg.router == "softmax" else "uniform",
        input_dropout=0.0 if cfg.head_dropout else p,
        head_dropout=p if cfg.head_dropout else 0.0,
        init=init, compensate=random, gamma=RLORA_GAMMA,
    )
