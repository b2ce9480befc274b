"""Merge an adapter into its base, export it as a PEFT LoRA, and say what a folder holds.

    rlora merge --adapter RUN/adapter --output merged/                 # a plain HF model folder
    rlora export --adapter RUN/adapter --format peft --output peft/    # PEFT, vLLM, TGI, llama.cpp
    rlora inspect RUN [--json]

Both merge and PEFT export take ΔW = B'·A' from `MultiHeadLoRA.static_factors()`, the one formula
for ΔW. A softmax router makes ΔW depend on each token, so those adapters are refused here after
reading rlora_config.json, before any weights load and before anything is written; the refusal
names the run's tasks, because `fold.py` folds them per task (`--task`, `--per-task`) through
`plan_merge`/`run_merge` and the PEFT pieces below. Output folders are written through
`files.atomic_dir`: an interrupted run leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from rlora_cli.adapters import (
    AdapterConfig,
    MultiHeadLoRA,
    adapter_layers,
    adapter_state,
    inject_adapters,
    merge_adapters,
)
from rlora_cli.card import model_card
from rlora_cli.checkpoint import (
    WEIGHTS_FILE,
    check_remote_code,
    check_tensors,
    load_adapter,
    read_adapter_config,
    read_weights,
    recorded_base,
)
from rlora_cli.config import DTYPE_NAMES
from rlora_cli.errors import UserError, first_line
from rlora_cli.files import atomic_dir, check_output_dir
from rlora_cli.model import load_model, meta_model, recorded_quantization
from rlora_cli.peft_format import make_peft_config, peft_targets, peft_tensors, write_peft
from rlora_cli.quant import dequantized_base
from rlora_cli.recipe.load import default_name, read_yaml
from rlora_cli.runs import CHECKPOINT_PREFIX, read_safetensors_header
from rlora_cli.runs import adapter_dir as find_adapter_dir

FORMATS = ("peft", "merged")
DEFAULT_SHARD = "5GB"  # what the hub's own large checkpoints use; transformers 5 defaults to 50GB
_DTYPE_FIX = "use --dtype bfloat16, float16 or float32"


# ---------------------------------------------------------------- merge


def merge_to_folder(adapter_dir: str | Path, output: str | Path, *, base: str | None = None,
                    dtype: str | None = None, overwrite: bool = False,
                    max_shard_size: str | int = DEFAULT_SHARD, trust_remote_code: bool = False,
                    console: Any = None) -> Path:
    """Fold the adapter into its base and write a standard Hugging Face model folder.

    The base is the one recorded in rlora_config.json unless `base` names another; the result is
    cast once to `dtype` (default: the dtype the adapter was trained over). Returns `output`.
    """
    job = plan_merge(adapter_dir, output, base=base, dtype=dtype, overwrite=overwrite,
                     trust_remote_code=trust_remote_code)
    return run_merge(job, max_shard_size=max_shard_size, console=console)


@dataclass(frozen=True)
class MergeJob:
    """A merge checked and ready to load: every refusal that needs no weights has been made."""

    adapter_dir: Path
    config: dict[str, Any]
    cfg: AdapterConfig
    output: Path
    base: str
    target: str
    """torch's name for the merged model's dtype."""
    trust_remote_code: bool = False


def plan_merge(adapter_dir: str | Path, output: str | Path, *, base: str | None = None,
               dtype: str | None = None, overwrite: bool = False, trust_remote_code: bool = False,
               routed: bool = False) -> MergeJob:
    """Check a merge before any weights load. A softmax router is refused unless `routed` (the
    caller fixes each routed layer's head mixture before `run_merge` folds it)."""
    adapter_dir, config, cfg = read_adapter(adapter_dir)
    if not routed:
        require_static(adapter_dir, config, cfg, "merge")
    target = _target_dtype(dtype, config)
    base = check_export(adapter_dir, config, base, output, overwrite, trust_remote_code, base_is_input=True)
    return MergeJob(adapter_dir, config, cfg, Path(output), base, target, trust_remote_code)


def run_merge(job: MergeJob, *, max_shard_size: str | int = DEFAULT_SHARD, console: Any = None,
              fold: Callable[[Any, Any], dict[str, Any] | None] | None = None, device: Any = None) -> Path:
    """Load the base and the adapter, fold, cast once, write the folder atomically.

    `fold(model, tokenizer)` runs after the adapter loads and before the merge: it fixes the head
    mixture of every routed layer and returns what the model card says about the fold."""
    _say(console, f"loading {escape(job.base)} and the {job.cfg.type} adapter from "
                  f"{escape(str(job.adapter_dir))}")
    quantization = recorded_quantization(job.config, f"{job.adapter_dir}/rlora_config.json")
    try:
        if quantization is not None:  # the weights the adapter trained against: W' = dequant(W_q)
            _say(console, f"dequantizing the {quantization.bits}-bit base into {job.target}: "
                          "merged W = dequant(W_q) + ΔW, as the adapter trained")
            model = dequantized_base(job.base, quantization, job.target,
                                     trust_remote_code=job.trust_remote_code, device=device)
        else:
            model, _ = load_model(job.base, dtype=_load_dtype(job.base, job.target, job.trust_remote_code),
                                  trust_remote_code=job.trust_remote_code, device=device)
    except UserError as e:
        raise UserError(e.problem, f"{e.fix}; or name the base model with --base") from None
    load_adapter(model, job.adapter_dir)
    model.eval()
    tokenizer = adapter_tokenizer(job.adapter_dir, job.base, job.trust_remote_code)
    fold_info = fold(model, tokenizer) if fold is not None else None
    if _untie_adapted_head(model):
        _say(console, "[yellow]note:[/] the adapter changes the LM head, which shares its weight with the "
                      "input embeddings; the merged model unties them")
    merge_adapters(model)  # float32 (or wider) per weight, checked finite
    model.to(getattr(torch, job.target))  # the one cast
    with atomic_dir(job.output) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(job.adapter_dir, fold=fold_info, merged=True))
    _say(console, f"[green]merged[/] {len(job.config['modules'])} modules into {escape(str(job.output))} "
                  f"({job.target})")
    return job.output


def _load_dtype(base: str, target: str, trust_remote_code: bool = False) -> str:
    """The dtype to load the base in so that the merge rounds exactly once, to `target`.

    merge_adapters adds ΔW in float32 and rounds to the weight's dtype. Loading in `target` is
    exact when the base is stored in it (and halves memory for bf16 bases); otherwise load in
    float32 (exact for any half-precision checkpoint) and cast after the merge.
    """
    if target == "float64":
        return "float64"
    try:
        stored = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), "dtype", None)
    except (OSError, ValueError):
        return "float32"  # load_model will say what is wrong with the base
    return target if str(stored).removeprefix("torch.") == target else "float32"


def _untie_adapted_head(model: Any) -> bool:
    """An adapted LM head tied to the input embeddings: merging into the shared tensor would
    change the embeddings too, so give the head its own copy and untie it in the config.
    Returns whether it did."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, MultiHeadLoRA) or emb is None:
        return False
    if head.base.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.base.weight = nn.Parameter(head.base.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def adapter_tokenizer(adapter_dir: Path, base: str, trust_remote_code: bool = False) -> Any:
    """The adapter's own tokenizer (what it was trained with) when it has one, else the base's."""
    source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer from {source}: {first_line(e)}",
                        "save the adapter with its tokenizer, or pass --base with a model that has one"
                        ) from None


# ---------------------------------------------------------------- PEFT export


def export_adapter(adapter_dir: str | Path, output: str | Path, *, format: str, base: str | None = None,
                   dtype: str | None = None, overwrite: bool = False,
                   max_shard_size: str | int = DEFAULT_SHARD, trust_remote_code: bool = False,
                   console: Any = None) -> Path:
    """`rlora export`: `format` peft (a PEFT LoRA adapter folder) or merged (same as merge)."""
    if format not in FORMATS:
        raise UserError(f"--format: unknown format {format!r}",
                        "use peft (a PEFT LoRA adapter folder) or merged (a full model folder)")
    if format == "merged":
        return merge_to_folder(adapter_dir, output, base=base, dtype=dtype, overwrite=overwrite,
                               max_shard_size=max_shard_size, trust_remote_code=trust_remote_code,
                               console=console)
    if dtype is not None:
        raise UserError("--dtype applies to --format merged only",
                        "drop --dtype: PEFT factors are written in float32 and servers cast them")
    export_peft(adapter_dir, output, base=base, overwrite=overwrite, trust_remote_code=trust_remote_code,
                console=console)
    return Path(output)


def export_peft(adapter_dir: str | Path, output: str | Path, *, base: str | None = None,
                overwrite: bool = False, trust_remote_code: bool = False,
                console: Any = None) -> dict[str, Any]:
    """Write the adapter as a PEFT LoRA folder; returns the adapter_config.json written.

    Needs only the base's config.json (modules are built on the meta device, no weights load),
    to check the adapter fits the base and to set fan_in_fan_out for Conv1D models.
    """
    adapter_dir, config, cfg = read_adapter(adapter_dir)
    require_static(adapter_dir, config, cfg, "export --format peft")
    base = check_export(adapter_dir, config, base, output, overwrite, trust_remote_code)
    layers, targets = _adapter_on_meta_base(adapter_dir, config, cfg, base, trust_remote_code)
    tensors, rank = peft_tensors(layers)
    peft_config = make_peft_config(base, rank, cfg.scaling, targets, layers)
    with atomic_dir(output) as tmp:
        write_peft(tmp, tensors, peft_config, adapter_dir)
    _say(console, f"[green]exported[/] a PEFT LoRA of rank {rank} over {len(layers)} modules to "
                  f"{escape(str(output))} (servers cap the rank: vLLM needs --max-lora-rank >= {rank})")
    return peft_config


def _adapter_on_meta_base(adapter_dir: Path, config: dict, cfg: AdapterConfig, base: str,
                          trust_remote_code: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The adapter's layers over a weightless (meta) copy of the base, and PEFT's target list."""
    fix = "pass --base with the base model's hub id or a folder holding its config.json"
    model = meta_model(base, fix=fix, trust_remote_code=trust_remote_code)
    path = adapter_dir / WEIGHTS_FILE
    tensors = read_weights(path)
    targets = peft_targets(model, config["modules"])
    dtype = next(iter(tensors.values())).dtype if tensors else None
    inject_adapters(model, cfg, modules=config["modules"], init=False, dtype=dtype)
    _assign(model, tensors, path)
    return adapter_layers(model), targets


def _assign(model: Any, tensors: dict[str, Any], path: Path) -> None:
    """Put the file's tensors into the meta adapter (same checks as checkpoint.load_adapter)."""
    check_tensors(adapter_state(model), tensors, path,
                  fix="use the base model it was trained on (see rlora inspect), or pass --base")
    model.load_state_dict(tensors, strict=False, assign=True)


# ---------------------------------------------------------------- shared checks


def read_adapter(adapter_dir: str | Path) -> tuple[Path, dict[str, Any], AdapterConfig]:
    """(adapter folder, rlora_config.json, AdapterConfig); a run folder means its adapter/."""
    d = Path(find_adapter_dir(str(adapter_dir)))
    config = read_adapter_config(d)
    return d, config, AdapterConfig.from_dict(config["adapter"])


def require_static(adapter_dir: Path, config: dict[str, Any], cfg: AdapterConfig, what: str) -> None:
    """Refuse a softmax router, naming the way out: a fold per task, or an adapter without router."""
    if not cfg.has_router:
        return
    recipe = run_recipe(adapter_dir, config)
    names = recipe_task_names(recipe) if recipe is not None else []
    tasks = (f"tasks of its recipe: {', '.join(names)}" if names else
             "no recipe.yaml beside the adapter names the tasks: add --recipe RECIPE")
    per_task = ", or --per-task for one PEFT LoRA per task" if what.startswith("export") else ""
    raise UserError(
        f"{what}: this {cfg.type} adapter has a softmax router, so ΔW depends on each token and no "
        "single set of fixed weights reproduces it (rlora makes no silent approximation)",
        f"fold the router for one task with --task NAME ({tasks}){per_task}; or train with "
        "adapter.router=off for an exactly mergeable adapter")


def run_recipe(adapter_dir: Path, config: dict[str, Any]) -> Path | None:
    """The recipe an adapter was trained from: RUN/recipe.yaml beside RUN/adapter (or above
    RUN/checkpoint-N/adapter), else the path rlora_config.json records, when it still exists."""
    here = [adapter_dir.parent]
    if adapter_dir.parent.name.startswith(CHECKPOINT_PREFIX):
        here.append(adapter_dir.parent.parent)
    found = [d / "recipe.yaml" for d in here if (d / "recipe.yaml").is_file()]
    recorded = config.get("recipe")
    if not found and isinstance(recorded, str) and Path(recorded).is_file():
        found.append(Path(recorded))
    return found[0] if found else None


def recipe_task_names(recipe: str | Path) -> list[str]:
    """The task names of a recipe, read from its YAML alone (no data file is opened)."""
    try:
        raw = read_yaml(recipe)
    except UserError:
        return []
    entries = (raw.get("data") or {}).get("datasets") if isinstance(raw.get("data"), dict) else None
    return [str(d.get("name") or default_name(str(d.get("path", "")), d.get("subset")))
            for d in entries or [] if isinstance(d, dict)]


def _target_dtype(dtype: str | None, config: dict[str, Any]) -> str:
    """torch's name for the merged model's dtype: `dtype`, else the one the adapter was trained over."""
    where = "--dtype" if dtype is not None else "rlora_config.json base_dtype"
    name = dtype if dtype is not None else config.get("base_dtype") or "float32"
    if name == "float64":  # a float64 base (tests compare against float64 references) stays float64
        return name
    if name == "auto":
        raise UserError(f"{where}: a merged model is written in one dtype, not 'auto'", _DTYPE_FIX)
    if name not in DTYPE_NAMES:
        raise UserError(f"{where}: unknown dtype {name!r}", _DTYPE_FIX)
    return DTYPE_NAMES[name]


def check_export(adapter_dir: Path, config: dict[str, Any], base: str | None, output: str | Path,
                 overwrite: bool, trust_remote_code: bool, *, base_is_input: bool = False) -> str:
    """What every merge and export checks before any weights load; returns the base to use."""
    check_remote_code(config, adapter_dir, trust_remote_code)
    read_safetensors_header(adapter_dir / WEIGHTS_FILE)  # a corrupt file fails now, not after a long load
    base = base_of(config, base, adapter_dir)
    check_output(output, overwrite, [adapter_dir, *([Path(base)] if base_is_input else [])])
    return base


def base_of(config: dict[str, Any], base: str | None, adapter_dir: Path) -> str:
    base = base or recorded_base(config, adapter_dir, option="--base")
    if not base:
        raise UserError("the adapter does not record its base model", "pass --base with the hub id or folder")
    return str(base)


def check_output(output: str | Path, overwrite: bool, inputs: list[Path]) -> None:
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is a file, not a folder",
                        "choose another --output, or remove the file")
    check_output_dir(out, "--output")  # a file where a parent folder should be
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output {out} exists and is not empty",
                        "choose another --output, or pass --overwrite to replace it")
    resolved = out.resolve()
    for source in inputs:
        if source.exists() and (resolved == source.resolve() or resolved in source.resolve().parents):
            raise UserError(f"--output {out} would replace the input {source}", "choose another --output")


def _say(console: Any, message: str) -> None:
    if console is not None:
        console.print(message, highlight=False)
