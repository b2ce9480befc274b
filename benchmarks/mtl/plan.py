"""What the multi-task benchmark runs: the tasks, the method variants, their parameter budgets,
and one recipe per (variant, seed).

Variants (`VARIANTS`): the four methods, R-LoRA's ablations (HydraLoRA + multi-head random init,
HydraLoRA + multi-head dropout; both switches together are exactly `rlora`), rlora with the
router off (uniform 1/n, mergeable), and `lora-matched`: a LoRA whose rank is the integer that
brings its trainable count closest to rlora's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlora_cli.errors import UserError

# name -> (adapter keys over the shared ones, what the variant is, for the table)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "lora": ({"type": "lora"}, "LoRA, rank r"),
    "lora-matched": ({"type": "lora"}, "LoRA with rlora's trainable count"),
    "multilora": ({"type": "multilora"}, "MultiLoRA: n parallel LoRAs, scalar gates"),
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
    dtype: str = "auto"
    precision: str = "auto"
    eval_batch_size: int = 16
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def check_methods(methods: tuple[str, ...]) -> None:
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}",
                        f"choose from {', '.join(VARIANTS)}")


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
    return {m: count_trainable(
                model, adapter_section(m, settings, lora_r=matched_r if m == "lora-matched" else None))
            for m in methods}


def count_trainable(model: str, adapter: dict[str, Any]) -> int:
    from rlora_cli.adapters import AdapterConfig, inject_adapters, parameter_counts
    from rlora_cli.model import meta_model

    lm = meta_model(model, fix="give --model a local model folder (the GPU machine is offline) "
                               "or a reachable hub id")
    inject_adapters(lm, AdapterConfig(**adapter))
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
    return {
        "seed": seed,
        "model": {"name_or_path": settings.model, "dtype": settings.dtype},
        "adapter": adapter_section(method, settings, lora_r=lora_r),
        "data": {"max_length": settings.max_length, "datasets": [
            {"name": name, "path": str(Path(path).resolve()), "format": "bigbench",
             "val_size": held_out_size(n, settings.val_size), "max_samples": settings.max_train}
            for name, (path, n) in tasks.items()]},
        "train": {"num_epochs": settings.num_epochs, "max_steps": settings.max_steps,
                  "micro_batch_size": settings.micro_batch_size,
                  "gradient_accumulation_steps": settings.gradient_accumulation_steps,
                  "learning_rate": settings.learning_rate, "lr_scheduler": "cosine",
                  "warmup_ratio": settings.warmup_ratio, "precision": settings.precision,
                  **settings.extra.get("train", {})},
        "output": {"save_steps": 0, "save_total_limit": 1, "logging_steps": 10, "eval_steps": 0},
    }


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    from rlora_cli.files import atomic_write_text

    head = (f"# written by python -m benchmarks.mtl; train it alone with:\n"
            f"#   rlora train {path} --output {path.parent.parent / 'runs' / path.stem}\n")
    atomic_write_text(path, head + yaml.safe_dump(data, sort_keys=False))
    return path
