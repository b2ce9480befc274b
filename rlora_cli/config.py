"""The recipe's typed sections and data kinds, no I/O.

Each section is a frozen dataclass with a docstring and a default per field, and checks itself
when built: `__post_init__` raises one `UserError` listing every problem at its YAML path, so
`TrainConfig(learning_rate=-1)` fails in Python as it does in a recipe. `recipe/load.py` reads the
YAML, checks types and numbers no run can use (`recipe/typed.py`: nan, inf, integers past 32
bits), and merges every section's problems into one report. The data kinds live here because the
checks need them; `data/templates.py` renders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlora_cli.errors import UserError, collect

if TYPE_CHECKING:  # only for the annotation: importing adapters/ would load torch with every config import
    from rlora_cli.adapters.methods import AdapterConfig

# The data kinds (data/templates.py renders each) and the templates a source can use.
KINDS = ("instruction", "nlu", "knowledge", "chat")
TEMPLATE_NAMES = ("default", "chat")
# The roles chat templates know; data/rows.py translates other datasets' names into these.
CHAT_ROLES = ("system", "user", "assistant", "tool")
# kind -> (required fields, optional fields), in the kind's own names (a recipe's `columns:` maps
# a source's column names onto these).
KIND_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instruction": (("instruction", "output"), ("input",)),
    "nlu": (("text", "label"), ("text_pair",)),
    "knowledge": (("question", "answer"), ("choices",)),
    "chat": (("messages",), ()),
}

# One dtype vocabulary for the recipe and every command's --dtype: each accepted spelling -> torch's
# name ("auto" stays auto: the model loader picks per device).
DTYPE_NAMES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
               "float16": "float16", "fp32": "float32", "float32": "float32"}
DTYPES = tuple(DTYPE_NAMES)
DTYPE_HELP = "auto | bf16 | fp16 | fp32"


def canonical_dtype(name: str, where: str) -> str:
    """torch's name for a dtype in any accepted spelling ('bf16' -> 'bfloat16'; 'auto' stays);
    UserError naming `where` (a YAML key or a flag) for anything else."""
    if name not in DTYPE_NAMES:
        raise UserError(f"{where}: unknown dtype {name!r}",
                        f"use {DTYPE_HELP} (or bfloat16, float16, float32)")
    return DTYPE_NAMES[name]


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
KERNELS = ("auto", "liger", "none")
ADAPTER_DTYPES = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
SCHEDULERS = ("linear", "cosine", "constant")
FORMATS = ("bigbench",)
# Accelerate's tracker names (`output.log_with`), plus none and all.
TRACKERS = ("none", "all", "tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive",
            "swanlab", "trackio")

# numpy (and accelerate's set_seed, which seeds numpy) accepts seeds in [0, 2**32-1].
SEED_RANGE = (0, 2**32 - 1)

FIX = "fix the recipe (recipes/demo.yaml is a complete example; rlora_cli/config.py documents every key)"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The frozen base model."""

    WHERE = "model"  # the YAML path its problems start with

    name_or_path: str
    """Hub id (Qwen/Qwen2.5-0.5B) or a local folder written by save_pretrained."""
    dtype: str = "auto"
    """Storage dtype of the frozen base: auto (bf16 where the device has it, else fp32) | bf16 | fp16
    | fp32."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (only for repositories you trust)."""
    attn_implementation: str = "sdpa"
    """sdpa | eager | flash_attention_2 (or another transformers attention backend)."""

    def __post_init__(self) -> None:
        validate(self)

    def problems(self, where: str) -> list[str]:
        p = []
        if not self.name_or_path.strip():
            p.append(f"{where}.name_or_path: empty; give a hub id or a local model folder")
        if self.dtype not in DTYPES:
            p.append(_choice(f"{where}.dtype", self.dtype, DTYPES))
        if self.attn_implementation not in ATTENTION and "/" not in self.attn_implementation:
            p.append(_choice(f"{where}.attn_implementation", self.attn_implementation, ATTENTION))
        return p


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """One training source; its name is the task id in logs, metrics and evaluation."""

    WHERE = "data.datasets[]"  # the YAML path of its problems (the loader fills in the index)

    name: str = ""
    """Task name ('' = from the path: the subset, the BIG-bench folder or the file name)."""
    path: str
    """Hub dataset id, or a local .jsonl/.json/.csv/.parquet file or folder of them (relative to
    the working directory); with format: bigbench, a BIG-bench task.json or its folder."""
    kind: str = ""
    """instruction | nlu | knowledge | chat ('' only with format: bigbench, which is knowledge)."""
    format: str | None = None
    """None (rows with the kind's fields) | bigbench (a BIG-bench task.json)."""
    subset: str | None = None
    """Hub sources: the configuration name (GLUE's sst2, mnli...)."""
    split: str | None = None
    """Hub sources: the split to read (None = train); slices such as train[:10%] work."""
    weight: float = 1.0
    """Relative share of training examples (before data.temperature); finite and > 0."""
    columns: dict[str, str] = field(default_factory=dict)
    """Kind field -> source column, for columns named differently ({text: sentence})."""
    label_words: tuple[str, ...] | None = None
    """nlu: the word for each label (integer labels index it); None = the labels are words."""
    template: str = "default"
    """default (the kind's template, see templates.py) | chat (the tokenizer's chat template)."""
    val_size: float | int = 0.05
    """Held-out rows: a fraction in [0, 1) or an integer count; split off before sampling."""
    max_samples: int | None = None
    """At most this many training examples drawn from this source per epoch (None = no cap)."""

    def __post_init__(self) -> None:
        if isinstance(self.label_words, list):
            object.__setattr__(self, "label_words", tuple(self.label_words))
        validate(self)

    def problems(self, where: str) -> list[str]:
        p = []
        if self.format is not None and self.format not in FORMATS:
            p.append(_choice(f"{where}.format", self.format, FORMATS))
        if self.format == "bigbench":
            p += [f"{where}.{k}: a BIG-bench task has fixed fields; remove {k}"
                  for k in ("columns", "label_words", "subset", "split") if getattr(self, k)]
            if self.kind not in ("", "knowledge"):
                p.append(f"{where}.kind: BIG-bench tasks become knowledge rows; "
                         "remove kind or set it to knowledge")
        elif self.kind not in KINDS:
            p.append(f"{where}.kind: missing; choose one of {', '.join(KINDS)}" if not self.kind
                     else _choice(f"{where}.kind", self.kind, KINDS))
        if not self.weight > 0:
            p.append(f"{where}.weight: must be > 0, got {self.weight:g}")
        if self.template not in TEMPLATE_NAMES:
            p.append(_choice(f"{where}.template", self.template, TEMPLATE_NAMES))
        p += self._size_problems(where) + self._field_problems(where)
        return p

    def _size_problems(self, where: str) -> list[str]:
        p, v = [], self.val_size
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            p.append(f"{where}.val_size: a fraction must be in [0, 1), got {v:g} (or give an integer count)")
        if isinstance(v, int) and v < 0:
            p.append(f"{where}.val_size: a count must be >= 0, got {v}")
        if self.max_samples is not None and self.max_samples < 1:
            p.append(f"{where}.max_samples: must be >= 1 (or null for no cap), got {self.max_samples}")
        return p

    def _field_problems(self, where: str) -> list[str]:
        if self.kind not in KIND_FIELDS or self.format:
            return []
        required, optional = KIND_FIELDS[self.kind]
        p = [f"{where}.columns.{k}: {self.kind} has no field {k!r}; its fields are "
             f"{', '.join(required + optional)}" for k in self.columns if k not in required + optional]
        if self.label_words is not None:
            if self.kind != "nlu":
                p.append(f"{where}.label_words: only nlu sources have label words; remove it")
            elif len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
                p.append(f"{where}.label_words: give at least two different words, "
                         f"got {list(self.label_words)}")
        return p


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The training mixture and how examples become token sequences."""

    WHERE = "data"  # the YAML path its problems start with

    max_length: int = 512
    """Tokens per sequence; longer examples lose tokens from the prompt side, never the response."""
    packing: bool = False
    """Pack several examples per row up to max_length (positions restart, no cross-attention)."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: only on responses)."""
    temperature: float = 1.0
    """Example shares follow weight^(1/temperature): 1 = weights as given; >1 flattens toward uniform,
    <1 sharpens toward the heaviest source (finite and > 0)."""
    num_samples: int | None = None
    """Training examples per epoch over all sources (None = the sum of every source's usable
    training rows, each capped by its max_samples)."""
    datasets: tuple[DatasetConfig, ...]
    """The sources; each becomes one task."""

    def __post_init__(self) -> None:
        validate(self)

    def problems(self, where: str) -> list[str]:
        p = []
        if self.max_length < 8:
            p.append(f"{where}.max_length: must be >= 8, got {self.max_length}")
        if not self.temperature > 0:
            p.append(f"{where}.temperature: must be > 0, got {self.temperature:g}")
        if self.num_samples is not None and self.num_samples < 1:
            p.append(f"{where}.num_samples: must be >= 1 (or null), got {self.num_samples}")
        if not self.datasets:
            p.append(f"{where}.datasets: empty; list at least one source")
        seen: dict[str, int] = {}
        for i, d in enumerate(self.datasets):
            if d.name in seen:
                p.append(f"{where}.datasets[{i}].name: {d.name!r} is also data.datasets[{seen[d.name]}]'s "
                         "name; task names must be unique (set name:)")
            seen.setdefault(d.name, i)
        return p


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
    precision: str = "auto"
    """Compute precision: auto (bf16 where supported, else fp32) | bf16 | fp16 | fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    kernels: str = "auto"
    """auto | liger | none: Liger's fused kernels on CUDA (auto = when installed)."""
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
        p += [f"{where}.{k}: must be >= 0, got {getattr(self, k):g}"
              for k in ("weight_decay", "max_grad_norm") if not getattr(self, k) >= 0]
        for key, allowed in (("lr_scheduler", SCHEDULERS), ("precision", PRECISIONS), ("kernels", KERNELS),
                             ("adapter_dtype", ADAPTER_DTYPES), ("compile_mode", COMPILE_MODES)):
            if getattr(self, key) not in allowed:
                p.append(_choice(f"{where}.{key}", getattr(self, key), allowed))
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
            p.append(_choice(f"{where}.log_with", self.log_with, TRACKERS))
        return p


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


def validate(section: Any) -> None:
    """Raise one UserError listing every problem of a section (its `__post_init__` calls this).
    Types, nan, inf and 32-bit integer bounds are the YAML's to get right: `recipe/typed.py`
    checks them as it reads; the comparisons here are written so that nan fails them too."""
    collect(section.problems(section.WHERE), FIX)


def _choice(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    return f"{where}: unknown value {value!r}; choose one of {', '.join(allowed)}"
