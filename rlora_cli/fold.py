"""Per-task folding of routed adapters (HydraLoRA, R-LoRA): merge, PEFT export, vLLM multi-LoRA.

    rlora merge  --adapter RUN --task facts --output merged-facts/
    rlora export --adapter RUN --format peft --task facts --output peft-facts/
    rlora export --adapter RUN --format peft --per-task --output peft/   # OUT/<task>/ + OUT/tasks.json

A softmax router mixes the heads per token, so ΔW has no single value. When a request's task is
known, the gate is fixed to the task's mean routing weights ω̄: per adapted module, the mean of
ω(x) over every token of the task's examples as the adapter's template renders them (prompt and
response, padding excluded; `routing.measure_usage`). `MultiHeadLoRA.static_factors(ω̄)` then
folds it like any static gate: B' = s·Σ_i ω̄_i·B_i, R-LoRA's compensation block appended.

The examples are the task's held-out split from the run's recipe (RUN/recipe.yaml, or the path
rlora_config.json records), else its training rows, else with `--data FILE` rows from a file in
the task's source format. `plan_folds` makes every check and reads those rows before any model
loads; the output is written (through `files.atomic_dir`) only once every fold is computed.
What is printed comes from report/fold.py.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rlora_cli.adapters import adapter_layers
from rlora_cli.data.pipeline import load_splits, to_example
from rlora_cli.data.sources import load_source
from rlora_cli.errors import UserError
from rlora_cli.export import (
    DEFAULT_SHARD,
    FORMATS,
    check_export,
    export_peft,
    plan_merge,
    read_adapter,
    recipe_task_names,
    run_merge,
    run_recipe,
)
from rlora_cli.files import atomic_dir
from rlora_cli.model import load_with_adapter
from rlora_cli.peft_format import make_peft_config, peft_targets, peft_tensors, portable, write_peft
from rlora_cli.recipe.load import default_name, load_recipe, read_yaml
from rlora_cli.report.eval import progress
from rlora_cli.report.fold import print_fold, print_folds, print_not_needed, print_vllm
from rlora_cli.routing import Usage, entropy, measure_usage

MANIFEST = "tasks.json"
# vLLM accepts these --max-lora-rank values only (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's LoRA on the LM head refuses larger vocabularies (vllm/lora/layers/logits_processor.py).
VLLM_LM_HEAD_VOCAB = 257024
_DATA_FIX = "give the task's rows in its source format (the recipe's kind, columns and template)"


@dataclass(frozen=True)
class FoldPlan:
    """Which rows each task's routing is measured on, read before any model loads."""

    recipe: Path
    examples: dict[str, list]
    """Task → the examples (data.templates.Example) to measure."""
    sources: dict[str, str]
    """Task → where its rows come from, in words."""
    templates: dict[str, str]
    max_length: int


@dataclass(frozen=True)
class Fold:
    """One task's fixed head mixture: per module, and what it was measured over."""

    task: str
    source: str
    examples: int
    tokens: int
    per_module: dict[str, list[float]]
    mixture: list[float]
    """ω̄ averaged over the modules (what the model card and the tables show)."""
    entropy: float
    """Of `mixture`, in nats: 0 = one head, ln(n) = uniform."""

    def info(self) -> dict[str, Any]:
        """The model card's and the results files' summary (no per-module rows)."""
        return {k: v for k, v in asdict(self).items() if k != "per_module"}


# ------------------------------------------------------------------------------ the commands


def export_folded(adapter: str | Path, output: str | Path, *, format: str, task: str | None = None,
                  per_task: bool = False, dtype: str | None = None,
                  max_shard_size: str | int = DEFAULT_SHARD, **kw: Any) -> Any:
    """`rlora export` with --task/--per-task: `format` merged is `merge_task`, peft `export_task`."""
    if format not in FORMATS:
        raise UserError(f"--format: unknown format {format!r}",
                        "use peft (a PEFT LoRA adapter folder) or merged (a full model folder)")
    if format == "merged":
        if per_task:
            raise UserError("--per-task writes PEFT LoRAs",
                            "use --format peft, or --format merged --task NAME")
        return merge_task(adapter, output, task=task, dtype=dtype, max_shard_size=max_shard_size, **kw)
    if dtype is not None:
        raise UserError("--dtype applies to --format merged only",
                        "drop --dtype: PEFT factors are written in float32 and servers cast them")
    return export_task(adapter, output, task=task, per_task=per_task, **kw)


def merge_task(adapter: str | Path, output: str | Path, *, task: str | None, data: str | Path | None = None,
               recipe: str | Path | None = None, base: str | None = None, dtype: str | None = None,
               overwrite: bool = False, max_shard_size: str | int = DEFAULT_SHARD,
               trust_remote_code: bool = False, batch_size: int = 8, console: Any = None) -> Path:
    """`rlora merge --task`: the plain HF model of one task's fold (a static adapter: as merge)."""
    if task is None:
        raise UserError("--data and --recipe choose the rows of a task's fold", "give them with --task NAME")
    job = plan_merge(adapter, output, base=base, dtype=dtype, overwrite=overwrite,
                     trust_remote_code=trust_remote_code, routed=True)
    if not job.cfg.has_router:
        print_not_needed(job.cfg.type, console)
        return run_merge(job, max_shard_size=max_shard_size, console=console)
    plan = plan_folds(job.adapter_dir, job.config, [task], data=data, recipe=recipe)

    def fold(model: Any, tokenizer: Any) -> dict[str, Any]:
        folded = measure_folds(model, tokenizer, plan, batch_size=batch_size, console=console)[task]
        set_mixtures(model, folded)
        print_fold(folded, console)
        return folded.info()

    return run_merge(job, max_shard_size=max_shard_size, console=console, fold=fold, device=_device())


def export_task(adapter: str | Path, output: str | Path, *, task: str | None = None, per_task: bool = False,
                data: str | Path | None = None, recipe: str | Path | None = None, base: str | None = None,
                overwrite: bool = False, trust_remote_code: bool = False, batch_size: int = 8,
                console: Any = None) -> dict[str, Any]:
    """`rlora export --format peft --task NAME | --per-task`: one PEFT LoRA per fold. Returns the
    adapter_config.json written (one task) or the tasks.json manifest (--per-task)."""
    if (task is None) == (not per_task):
        raise UserError("a fold needs exactly one of --task NAME and --per-task",
                        "--task NAME writes one task's PEFT LoRA, --per-task one per task under OUTPUT")
    adapter_dir, config, cfg = read_adapter(adapter)
    if not cfg.has_router:
        print_not_needed(cfg.type, console)
        return export_peft(adapter_dir, output, base=base, overwrite=overwrite,
                           trust_remote_code=trust_remote_code, console=console)
    base = check_export(adapter_dir, config, base, output, overwrite, trust_remote_code)
    plan = plan_folds(adapter_dir, config, None if per_task else [task], data=data, recipe=recipe)
    model, tokenizer, _ = load_with_adapter(base, str(adapter_dir), trust_remote_code=trust_remote_code)
    folds = measure_folds(model, tokenizer, plan, batch_size=batch_size, console=console)
    written = _peft_folds(model, config["modules"], base, cfg.scaling, folds)
    rank = max(peft_config["r"] for _, peft_config in written.values())
    folders = _folder_names(list(folds)) if per_task else {}
    manifest = _manifest(adapter_dir, base, cfg.type, folds, folders, rank)
    with atomic_dir(output) as tmp:
        for name, (tensors, peft_config) in written.items():
            write_peft(tmp / folders.get(name, ""), tensors, peft_config, adapter_dir, folds[name].info())
        if per_task:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print_folds(folds, output, rank, console)
    if per_task:
        command, why = vllm_serve(base, {t: Path(output) / f for t, f in folders.items()}, rank,
                                  _adapted_head_vocab(model))
        print_vllm(command, why, console)
        return manifest
    return written[task][1]


def _peft_folds(model: Any, modules: list[str], base: str, scaling: float,
                folds: dict[str, Fold]) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """{task: (PEFT tensors, adapter_config.json)} of each fold, all computed before any write."""
    layers, targets = adapter_layers(model), peft_targets(model, modules)
    written = {}
    for name, folded in folds.items():
        tensors, rank = peft_tensors(layers, folded.per_module)
        written[name] = (tensors, make_peft_config(base, rank, scaling, targets, layers))
    return written


# ------------------------------------------------------------------------ planning the rows


def plan_folds(adapter_dir: Path, config: dict[str, Any], tasks: list[str] | None, *,
               data: str | Path | None = None, recipe: str | Path | None = None) -> FoldPlan:
    """The rows each task is measured on (`tasks` None: every task of the recipe); every bad
    input (no recipe, an unknown task, a missing --data file, no rows) is a UserError now."""
    path = Path(recipe) if recipe is not None else run_recipe(adapter_dir, config)
    if path is None:
        raise UserError(f"{adapter_dir}: no recipe.yaml beside the adapter, and rlora_config.json records "
                        "none that still exists", "pass --recipe with the recipe it was trained from")
    path = path.absolute()  # the manifest and the model cards say where the rows came from
    names = recipe_task_names(path)
    wanted = names if tasks is None else tasks
    unknown = [t for t in wanted if t not in names]
    if unknown and names:
        raise UserError(f"--task {unknown[0]}: the recipe {path} has no such task",
                        f"choose one of: {', '.join(names)}")
    if data is not None:
        return _plan_from_file(path, wanted, Path(data))
    loaded = _load_recipe(path, data_hint=True)
    splits = load_splits(loaded, with_train=False)
    if any(not splits[t][1] for t in wanted):  # a task without held-out rows: its training rows
        splits = load_splits(loaded)
    examples = {t: splits[t][1] or splits[t][0] for t in wanted}
    sources = {t: (f"the held-out split of {path}" if splits[t][1] else
                   f"the training rows of {path} (the task has no held-out rows)") for t in wanted}
    return _plan(path, loaded, examples, sources)


def _plan_from_file(path: Path, tasks: list[str], data: Path) -> FoldPlan:
    """--data: the one task's rows from a file read as the recipe's source of that task."""
    if len(tasks) != 1:
        raise UserError("--data holds the rows of one task", "use --data with --task NAME, not --per-task")
    if not data.exists():
        raise UserError(f"--data {data}: no such file or folder", _DATA_FIX)
    task = tasks[0]
    entries = [d for d in read_yaml(path)["data"]["datasets"]
               if (d.get("name") or default_name(str(d.get("path", "")), d.get("subset"))) == task]
    entry = {k: v for k, v in entries[0].items() if k not in ("subset", "split")}
    entry |= {"name": task, "path": str(data), "val_size": 0}
    loaded = _load_recipe(path, overrides=[f"data.datasets={json.dumps([entry])}"])
    cfg = loaded.data.datasets[0]
    rows, dropped, words = load_source(cfg, "--data")
    examples = [to_example(row, task, cfg.kind, words) for row in rows.to_list()]
    if not examples:
        raise UserError(f"--data {data}: no usable {cfg.kind} rows for task {task} "
                        f"({dropped} dropped for empty fields)", _DATA_FIX)
    return _plan(path, loaded, {task: examples}, {task: f"{data} (--data)"})


def _load_recipe(path: Path, overrides: list[str] | None = None, data_hint: bool = False) -> Any:
    try:
        return load_recipe(path, overrides or [])
    except UserError as e:
        hint = "; or give one task's rows with --task NAME --data FILE" if data_hint else ""
        raise UserError(e.problem, e.fix + hint, e.problems) from None


def _plan(path: Path, recipe: Any, examples: dict[str, list], sources: dict[str, str]) -> FoldPlan:
    empty = [t for t, rows in examples.items() if not rows]
    if empty:
        raise UserError(f"task {empty[0]} has no examples to measure its routing on",
                        f"give its rows with --data FILE ({_DATA_FIX})")
    templates = {d.name: d.template for d in recipe.data.datasets}
    return FoldPlan(path, examples, sources, templates, recipe.data.max_length)


# ------------------------------------------------------------------------ measuring, fixing


def measure_folds(model: Any, tokenizer: Any, plan: FoldPlan, *, batch_size: int = 8,
                  console: Any = None) -> dict[str, Fold]:
    """{task: Fold}: the routing of the model's own softmax routers over each task's rows."""
    set_mixtures(model, None)  # measure the routers themselves
    total = sum(len(rows) for rows in plan.examples.values())
    with progress(console, total, "routing per task") as advance:
        usage = measure_usage(model, tokenizer, plan.examples, templates=plan.templates,
                              max_length=plan.max_length, batch_size=batch_size, progress=advance)
    return {task: _fold(task, plan.sources[task], u) for task, u in usage.items()}


def _fold(task: str, source: str, usage: Usage) -> Fold:
    mixture = usage.mean
    return Fold(task, source, usage.examples, usage.tokens, usage.per_module, mixture, entropy(mixture))


def set_mixtures(model: Any, fold: Fold | None) -> None:
    """Fix every routed layer's head mixture to the fold's (None: back to the softmax routers)."""
    for name, layer in adapter_layers(model).items():
        if layer.spec.gate == "router":
            layer.fixed_mixture = None if fold is None else torch.tensor(fold.per_module[name],
                                                                        dtype=torch.float64)


# ------------------------------------------------------------------------- writing, serving


def vllm_serve(base: str, folders: dict[str, Path], rank: int,
               head_vocab: int | None = None) -> tuple[str | None, str | None]:
    """(`vllm serve` line, None), or (None, why vLLM cannot load these adapters)."""
    max_rank = vllm_rank(rank)
    if max_rank is None:
        return None, (f"the folded adapters have rank {rank} and vLLM's --max-lora-rank is at most "
                      f"{VLLM_RANKS[-1]}; train with a smaller adapter.r (a fold of R-LoRA has rank 2·r)")
    if head_vocab is not None and head_vocab > VLLM_LM_HEAD_VOCAB:
        return None, (f"the adapter changes the LM head of a {head_vocab}-token vocabulary and vLLM's "
                      f"LoRA handles at most {VLLM_LM_HEAD_VOCAB}; train without lm_head in "
                      "adapter.target_modules")
    modules = [shlex.quote(f"{task}={Path(path).absolute()}") for task, path in folders.items()]
    return (f"vllm serve {shlex.quote(portable(base))} --enable-lora --lora-modules {' '.join(modules)} "
            f"--max-lora-rank {max_rank} --max-loras {len(folders)}"), None


def vllm_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank` (None: past its largest)."""
    return next((r for r in VLLM_RANKS if r >= rank), None)


def _adapted_head_vocab(model: Any) -> int | None:
    head = model.get_output_embeddings()
    return head.out_features if head in adapter_layers(model).values() else None


def _folder_names(tasks: list[str]) -> dict[str, str]:
    """A folder name per task: its name with anything but letters, digits, . _ - made _, unique."""
    out: dict[str, str] = {}
    for task in tasks:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", task).strip(".") or "task"
        while name in out.values():
            name += "_"
        out[task] = name
    return out


def _manifest(adapter_dir: Path, base: str, method: str, folds: dict[str, Fold], folders: dict[str, str],
              rank: int) -> dict[str, Any]:
    """OUT/tasks.json: where each task's LoRA is, and the fold it holds."""
    return {"adapter": str(adapter_dir.absolute()), "base_model": portable(base), "method": method,
            "rank": rank, "vllm_max_lora_rank": vllm_rank(rank),
            "tasks": {t: {"folder": folders.get(t), **f.info(), "rank": rank, "per_module": f.per_module}
                      for t, f in folds.items()}}


def _device() -> Any:
    return "cuda" if torch.cuda.is_available() else None
