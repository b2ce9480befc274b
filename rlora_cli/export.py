"""Merge an adapter into its base, export it as a PEFT LoRA, and say what a folder holds.

    rlora merge --adapter RUN/adapter --output merged/                 # a plain HF model folder
    rlora export --adapter RUN/adapter --format peft --output peft/    # PEFT, vLLM, TGI, llama.cpp
    rlora inspect RUN [--json]

Both merge and PEFT export take ΔW = B'·A' from `MultiHeadLoRA.static_factors()`, the one formula
for ΔW. A softmax router makes ΔW depend on each token, so those adapters are refused after
reading rlora_config.json, before any weights load and before anything is written. Output
folders are written through `files.atomic_dir`: an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from safetensors.torch import save_file
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
from rlora_cli.adapters.layer import is_conv1d
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
from rlora_cli.model import load_model, meta_model
from rlora_cli.runs import adapter_dir as find_adapter_dir
from rlora_cli.runs import read_safetensors_header

FORMATS = ("peft", "merged")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DEFAULT_SHARD = "5GB"  # what the hub's own large checkpoints use; transformers 5 defaults to 50GB
_DTYPE_FIX = "use --dtype bfloat16, float16 or float32"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "chat_template.jinja", "chat_template.json")


# ---------------------------------------------------------------- merge


def merge_to_folder(adapter_dir: str | Path, output: str | Path, *, base: str | None = None,
                    dtype: str | None = None, overwrite: bool = False,
                    max_shard_size: str | int = DEFAULT_SHARD, trust_remote_code: bool = False,
                    console: Any = None) -> Path:
    """Fold the adapter into its base and write a standard Hugging Face model folder.

    The base is the one recorded in rlora_config.json unless `base` names another; the result is
    cast once to `dtype` (default: the dtype the adapter was trained over). Returns `output`.
    """
    adapter_dir, config, cfg = _read(adapter_dir)
    _require_static(cfg, "merge")
    check_remote_code(config, adapter_dir, trust_remote_code)
    read_safetensors_header(adapter_dir / WEIGHTS_FILE)  # a corrupt file fails now, not after a long load
    target = _target_dtype(dtype, config)
    base = _base_of(config, base, adapter_dir)
    _check_output(output, overwrite, [adapter_dir, Path(base)])

    _say(console, f"loading {escape(base)} and the {cfg.type} adapter from {escape(str(adapter_dir))}")
    try:
        model, _ = load_model(base, dtype=_load_dtype(base, target, trust_remote_code),
                              trust_remote_code=trust_remote_code)
    except UserError as e:
        raise UserError(e.problem, f"{e.fix}; or name the base model with --base") from None
    load_adapter(model, adapter_dir)
    model.eval()
    if _untie_adapted_head(model):
        _say(console, "[yellow]note:[/] the adapter changes the LM head, which shares its weight with the "
                      "input embeddings; the merged model unties them")
    merge_adapters(model)  # float32 (or wider) per weight, checked finite
    model.to(getattr(torch, target))  # the one cast
    tokenizer = _tokenizer(adapter_dir, base, trust_remote_code)
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    _say(console, f"[green]merged[/] {len(config['modules'])} modules into {escape(str(output))} ({target})")
    return Path(output)


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


def _tokenizer(adapter_dir: Path, base: str, trust_remote_code: bool = False) -> Any:
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
    adapter_dir, config, cfg = _read(adapter_dir)
    _require_static(cfg, "export --format peft")
    check_remote_code(config, adapter_dir, trust_remote_code)
    read_safetensors_header(adapter_dir / WEIGHTS_FILE)
    base = _base_of(config, base, adapter_dir)
    _check_output(output, overwrite, [adapter_dir])
    layers, targets = _adapter_on_meta_base(adapter_dir, config, cfg, base, trust_remote_code)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        B, A = layer.static_factors()
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise UserError(f"the adapter of {name} holds non-finite values",
                            "the adapter is corrupt or training diverged; use an earlier checkpoint")
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (B / cfg.scaling).contiguous()  # PEFT applies s
    rank = max(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
    fan_in_fan_out = any(is_conv1d(layer.base) for layer in layers.values())
    peft_config = _peft_config(base, rank, cfg.scaling, targets, fan_in_fan_out)
    with atomic_dir(output) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        for name in _TOKENIZER_FILES:  # the tokenizer it was trained with, for servers that read it
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, tmp / name)
    _say(console, f"[green]exported[/] a PEFT LoRA of rank {rank} over {len(layers)} modules to "
                  f"{escape(str(output))} (servers cap the rank: vLLM needs --max-lora-rank >= {rank})")
    return peft_config


def _peft_config(base: str, rank: int, scaling: float, targets: list[str],
                 fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT's adapter_config.json for factors A' and B'/s of rank `rank`."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _portable(base),
        "revision": None,
        "r": rank,
        # B'/s is exported and PEFT's own scaling lora_alpha / r' puts s back, so
        # lora_alpha = s·r' (never rslora) reproduces rlora's ΔW whatever options it trained with.
        "lora_alpha": scaling * rank,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": targets,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _adapter_on_meta_base(adapter_dir: Path, config: dict, cfg: AdapterConfig, base: str,
                          trust_remote_code: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The adapter's layers over a weightless (meta) copy of the base, and PEFT's target list."""
    fix = "pass --base with the base model's hub id or a folder holding its config.json"
    model = meta_model(base, fix=fix, trust_remote_code=trust_remote_code)
    path = adapter_dir / WEIGHTS_FILE
    tensors = read_weights(path)
    targets = _peft_targets(model, config["modules"])
    dtype = next(iter(tensors.values())).dtype if tensors else None
    inject_adapters(model, cfg, modules=config["modules"], init=False, dtype=dtype)
    _assign(model, tensors, path)
    return adapter_layers(model), targets


def _assign(model: Any, tensors: dict[str, Any], path: Path) -> None:
    """Put the file's tensors into the meta adapter (same checks as checkpoint.load_adapter)."""
    check_tensors(adapter_state(model), tensors, path,
                  fix="use the base model it was trained on (see rlora inspect), or pass --base")
    model.load_state_dict(tensors, strict=False, assign=True)


def _peft_targets(model: Any, modules: list[str]) -> list[str]:
    """Short names (q_proj, …) when they pick exactly the wrapped modules, else the full paths.

    PEFT wraps every module whose name ends with a target; an adapter on some layers only must
    list full paths, or PEFT would add (zero) LoRA layers elsewhere and warn about missing keys
    (or fail on a same-named module that is not a Linear).
    """
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    same_named = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in short}
    return short if same_named == set(modules) else sorted(modules)


# ---------------------------------------------------------------- shared checks


def _read(adapter_dir: str | Path) -> tuple[Path, dict[str, Any], AdapterConfig]:
    """(adapter folder, rlora_config.json, AdapterConfig); a run folder means its adapter/."""
    d = Path(find_adapter_dir(str(adapter_dir)))
    config = read_adapter_config(d)
    return d, config, AdapterConfig.from_dict(config["adapter"])


def _require_static(cfg: AdapterConfig, what: str) -> None:
    if cfg.has_router:
        raise UserError(
            f"{what}: this {cfg.type} adapter has a softmax router, so ΔW depends on each token and "
            "cannot be folded into fixed weights (rlora makes no silent approximation)",
            "evaluate or serve the adapter directly with rlora (eval/generate --adapter), "
            "or train with adapter.router=off to make it mergeable")


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


def _base_of(config: dict[str, Any], base: str | None, adapter_dir: Path) -> str:
    base = base or recorded_base(config, adapter_dir, option="--base")
    if not base:
        raise UserError("the adapter does not record its base model", "pass --base with the hub id or folder")
    return str(base)


def _portable(base: str) -> str:
    """A local base as an absolute path, so the exported adapter works from any folder."""
    return os.path.abspath(base) if Path(base).expanduser().is_dir() else base


def _check_output(output: str | Path, overwrite: bool, inputs: list[Path]) -> None:
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
