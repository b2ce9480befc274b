"""What the multi-task benchmark runs: the tasks, the method variants, their parameter budgets,
and one recipe per (variant, seed).

Variants (`VARIANTS`): the four methods, R-LoRA's ablations (HydraLoRA + multi-head random init,
HydraLoRA + multi-head dropout; both switches together are exactly `rlora`), rlora with the
router off (uniform 1/n, mergeable), `lora-matched`: a LoRA whose rank is the integer that
brings its trainable count closest to rlora's, and two router variants of rlora: the router at
ten times the adapters' learning rate (`rlora-router-lr`), and a mutual-information
task-balancing loss on the router (`rlora-mi`, adapter.router_aux_weight).

Step budgets: without `Settings.budgets` a run trains `max_steps` on a cosine schedule (round 1).
With budgets (learning curves) the learning rate is constant after a fixed warm-up of
`warmup_steps`, whatever the budgets: so checkpoint-N is the adapter a run stopped at N would have
been (no schedule decaying toward a horizon the shorter budgets never had), a run trained to one
budget and resumed to the next is the run planned to the largest (budgets.py trains it so, a
segment per budget), and budgets can be added later without changing the earlier ones. The
recipe's max_steps is the largest budget (what one run alone would train); each segment ends with
its budget's checkpoint and saves one every `checkpoint_every` steps on its way, all kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlora_cli.errors import UserError

# name -> (adapter keys over the shared ones, what the variant is, for the table)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "lora": ({"type": "lora"}, "LoRA, rank r"),
    "lora-matched": ({"type": "lora"}, "LoRA with rlora's trainable count"),
    "multilora": ({"type": "multilora"}, "MultiLoRA: n parallel LoRAs, scalar gates"),
    "multilora-gate1": ({"type": "multilora", "gate_lr_ratio": 1.0},
                        "MultiLoRA with its gates at the adapters' learning rate (the old default)"),
    "hydralora": ({"type": "hydralora", "random_init": False, "head_dropout": False},
                  "HydraLoRA: shared A, n B heads, softmax router"),
    "hydralora-ri": ({"type": "hydralora", "random_init": True, "head_dropout": False},
                     "HydraLoRA + multi-head random init"),
    "hydralora-hd": ({"type": "hydralora", "random_init": False, "head_dropout": True},
                     "HydraLoRA + multi-head dropout"),
    "rlora": ({"type": "rlora", "random_init": True, "head_dropout": True},
              "R-LoRA: random init + multi-head dropout"),
    "rlora-router-off": ({"type": "rlora", "random_init": True, "head_dropout": True, "router": "off"},
                         "R-LoRA with uniform 1/n heads"),
    "rlora-router-lr": ({"type": "rlora", "random_init": True, "head_dropout": True, "router_lr_ratio": 10},
                        "R-LoRA, the router at 10x the learning rate"),
    "rlora-mi": ({"type": "rlora", "random_init": True, "head_dropout": True, "router_aux_weight": 0.05},
                 "R-LoRA + mutual-information task-balancing router loss (weight 0.05)"),
    # The MI loss has no gradient at a uniform router, where R-LoRA's zero-init router starts; the
    # 10x router learning rate moves it off uniform first.
    "rlora-router-lr-mi": ({"type": "rlora", "random_init": True, "head_dropout": True, "router_lr_ratio": 10,
                            "router_aux_weight": 0.05},
                           "R-LoRA, the router at 10x the learning rate + the MI router loss (weight 0.05)"),
}
SMOKE_METHODS = ("lora", "rlora")


def routed(method: str) -> bool:
    """A variant with a softmax router: `--fold` scores its per-task folds too."""
    keys = VARIANTS[method][0]
    return keys["type"] in ("hydralora", "rlora") and keys.get("router", "softmax") == "softmax"


@dataclass(frozen=True)
class Settings:
    """Everything a run of the benchmark fixes; saved in results.json."""

    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    methods: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = ()
    """Task names (folders under the tasks dir); empty = every task that loads."""
    r: int = 8
    num_heads: int = 3
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] | str = ("gate_proj", "up_proj", "down_proj")
    val_size: int = 100
    """Held-out examples per task (at most a quarter of the task), scored before and after."""
    max_train: int = 500
    """Training examples per task per epoch (data.datasets[].max_samples)."""
    max_length: int = 512
    num_epochs: int = 2
    max_steps: int = -1
    micro_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    """Warm-up of the one-budget runs (cosine), a fraction of max_steps."""
    warmup_steps: int = 18
    """Warm-up of the learning curves, in steps, the same for every budget (18: what warmup_ratio
    0.03 of 600 steps gave the first GPU call's budgets 150/300/600)."""
    dtype: str = "auto"
    precision: str = "auto"
    eval_batch_size: int = 16
    budgets: tuple[int, ...] = ()
    """Step budgets of the learning curves (ascending), each scored as soon as it is trained to;
    empty = one budget of max_steps on a cosine schedule."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def check_methods(methods: tuple[str, ...]) -> None:
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}",
                        f"choose from {', '.join(VARIANTS)}")


def pairs(settings: Settings, shard: tuple[int, int] | None = None) -> list[tuple[str, int]]:
    """The (variant, seed) runs, seed by seed; `shard` (i, k): every k-th of them from the i-th
    (i from 1), so k processes started with the same options share the runs without overlap."""
    every = [(m, s) for s in settings.seeds for m in settings.methods]
    return every[shard[0] - 1::shard[1]] if shard else every


def checkpoint_every(budgets: tuple[int, ...]) -> int:
    """Steps between the checkpoints a segment saves on its way (its last is at its budget): the
    smallest budget, so a process killed without warning loses fewer steps than that, and a run
    has at most largest/smallest of them, however many budgets there are."""
    return min(budgets)


# ------------------------------------------------------------------------------------ tasks


def find_tasks(tasks_dir: str | Path, names: tuple[str, ...] = ()) -> dict[str, tuple[Path, int]]:
    """{task name: (task.json, number of examples)} of the JSON BIG-bench tasks under `tasks_dir`.

    A task is a folder with a task.json holding `examples` (parents of subtasks and
    programmatic tasks hold none and are skipped); its name is its path under `tasks_dir`.
    """
    from rlora_cli.data.bigbench import load_bigbench as read_bigbench

    root = Path(tasks_dir)
    if not root.is_dir():
        raise UserError(f"--tasks-dir {root}: no such folder",
                        "give a folder of BIG-bench task folders (make bigbench-data writes data/bigbench)")
    files = sorted(root.rglob("task.json"))
    if not files:
        raise UserError(f"--tasks-dir {root}: no task.json files in it",
                        "give a folder of BIG-bench task folders, each with a task.json "
                        "(make bigbench-data writes data/bigbench)")
    found: dict[str, tuple[Path, int]] = {}
    for f in files:
        name = f.parent.relative_to(root).as_posix() if f.parent != root else root.name
        try:
            found[name] = (f, len(read_bigbench(str(f))["examples"]))
        except UserError:
            continue  # no examples: a parent of subtasks, or a programmatic task
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise UserError(f"--tasks: no JSON task {', '.join(missing)} under {root}",
                            f"tasks found: {', '.join(list(found)[:12])}{' …' if len(found) > 12 else ''}")
        found = {n: found[n] for n in names}
    if not found:
        raise UserError(f"--tasks-dir {root}: none of its task.json files holds examples",
                        "give JSON BIG-bench tasks (programmatic tasks are not supported)")
    return found


def held_out_size(n_examples: int, val_size: int) -> int:
    """At most val_size held-out examples, and at most a quarter of the task (at least 1)."""
    return max(1, min(val_size, n_examples // 4))


# ----------------------------------------------------------------------------- the budgets


def trainable_counts(model: str, settings: Settings, methods: tuple[str, ...],
                     matched_r: int) -> dict[str, int]:
    """Trainable parameters of each variant on `model`, counted on a weightless (meta) copy."""
    counts = {}
    for m in methods:
        try:
            counts[m] = count_trainable(
                model, adapter_section(m, settings, lora_r=matched_r if m == "lora-matched" else None))
        except UserError as e:  # name the variant whose adapter section or model failed
            raise UserError(f"variant {m}: {e.problem}", e.fix) from None
    return counts


def count_trainable(model: str, adapter: dict[str, Any]) -> int:
    from rlora_cli.adapters import AdapterConfig, inject_adapters, parameter_counts
    from rlora_cli.model import meta_model

    lm = meta_model(model, fix="give --model a local model folder (the GPU machine is offline) "
                               "or a reachable hub id")
    inject_adapters(lm, AdapterConfig.from_dict(adapter))
    return parameter_counts(lm)[0]


def matched_lora_rank(model: str, settings: Settings) -> int:
    """The LoRA rank whose trainable count is closest to rlora's (LoRA's count is linear in r)."""
    target = count_trainable(model, adapter_section("rlora", settings))
    per_rank = count_trainable(model, adapter_section("lora", settings, lora_r=1))
    return max(1, round(target / per_rank))


def adapter_section(method: str, settings: Settings, *, lora_r: int | None = None) -> dict[str, Any]:
    keys, _ = VARIANTS[method]
    targets = settings.target_modules
    # Every key is explicit: the recipe loader fills missing ones from each method's own preset
    # (configs/adapters/), which differ in alpha, dropout and rslora.
    section: dict[str, Any] = {"r": settings.r, "lora_alpha": settings.lora_alpha,
                               "lora_dropout": settings.lora_dropout, "use_rslora": False,
                               "target_modules": list(targets) if isinstance(targets, tuple) else targets,
                               **keys}
    if keys["type"] == "lora":
        section["num_heads"] = 1
        if lora_r is not None:
            section["r"] = lora_r
            # Keep LoRA's scaling s = alpha / r equal to the other variants' at any rank.
            section["lora_alpha"] = settings.lora_alpha * lora_r / settings.r
    else:
        section["num_heads"] = settings.num_heads
    if keys["type"] in ("hydralora", "rlora"):
        section = {"router": "softmax", "init": "paper", **section}
    return section


# ------------------------------------------------------------------------------ the recipes


def recipe(method: str, seed: int, settings: Settings, tasks: dict[str, tuple[Path, int]],
           matched_r: int) -> dict[str, Any]:
    """The recipe (as a YAML mapping) of one variant and seed."""
    lora_r = matched_r if method == "lora-matched" else settings.r
    budgets = settings.budgets
    if budgets:  # learning curves: constant after a fixed warm-up, a checkpoint at every budget, all kept
        schedule = {"max_steps": max(budgets), "lr_scheduler": "constant"}
        warmup = {"warmup_steps": settings.warmup_steps}
        # A log window ends at every budget: the loss logged at N is the same window either way.
        output = {"save_steps": checkpoint_every(budgets), "save_total_limit": 0,
                  "logging_steps": math.gcd(10, *budgets), "eval_steps": 0}
    else:
        schedule = {"max_steps": settings.max_steps, "lr_scheduler": "cosine"}
        output = {"save_steps": 0, "save_total_limit": 1, "logging_steps": 10, "eval_steps": 0}
        warmup = {}  # warmup_ratio alone: round 1's recipes as they were
    return {
        "seed": seed,
        "model": {"name_or_path": settings.model, "dtype": settings.dtype},
        "adapter": adapter_section(method, settings, lora_r=lora_r),
        "data": {"max_length": settings.max_length, "datasets": [
            {"name": name, "path": str(Path(path).resolve()), "format": "bigbench",
             "val_size": held_out_size(n, settings.val_size), "max_samples": settings.max_train}
            for name, (path, n) in tasks.items()]},
        "train": {"num_epochs": settings.num_epochs, "max_steps": schedule["max_steps"],
                  "micro_batch_size": settings.micro_batch_size,
                  "gradient_accumulation_steps": settings.gradient_accumulation_steps,
                  "learning_rate": settings.learning_rate, "lr_scheduler": schedule["lr_scheduler"],
                  "warmup_ratio": settings.warmup_ratio, **warmup, "precision": settings.precision,
                  **settings.extra.get("train", {})},
        "output": output,
    }


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    from rlora_cli.files import atomic_write_text

    head = (f"# written by python -m benchmarks.mtl; train it alone with:\n"
            f"#   rlora train {path} --output {path.parent.parent / 'runs' / path.stem}\n")
    atomic_write_text(path, head + yaml.safe_dump(data, sort_keys=False))
    return path
