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
import shutil
from pathlib import Path
from typing import Any

from rich.markup import escape

from rlora_cli.adapters import AdapterConfig, adapter_layers, adapter_state, inject_adapters, layer_spec
from rlora_cli.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_output_dir,
    check_remote_code,
    check_tensors,
    read_adapter_config,
    read_weights,
    recorded_base,
)
from rlora_cli.errors import UserError, first_line
from rlora_cli.files import atomic_dir

FORMATS = ("peft", "merged")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DEFAULT_SHARD = "5GB"  # what the hub's own large checkpoints use; transformers 5 defaults to 50GB
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "float32": "float32", "fp32": "float32", "float64": "float64"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "chat_template.jinja", "chat_template.json")
_FROZEN = ("rlora_A0", "rlora_B0")  # R-LoRA's saved initial factors: in the file, never trained


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

    import torch

    from rlora_cli.adapters.inject import merge_adapters
    from rlora_cli.checkpoint import load_adapter
    from rlora_cli.model import load_model

    _say(console, f"loading {escape(base)} and the {cfg.type} adapter from {escape(str(adapter_dir))}")
    try:
        model, _ = load_model(base, dtype=_load_dtype(base, target, trust_remote_code),
                              trust_remote_code=trust_remote_code)
    except UserError as e:
        raise UserError(e.problem, f"{e.fix}; or name the base model with --base") from None
    load_adapter(model, adapter_dir)
    model.eval()
    _untie_adapted_head(model, console)
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
    from transformers import AutoConfig

    try:
        stored = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), "dtype", None)
    except (OSError, ValueError):
        return "float32"  # load_model will say what is wrong with the base
    return target if str(stored).removeprefix("torch.") == target else "float32"


def _untie_adapted_head(model: Any, console: Any) -> None:
    """An adapted LM head tied to the input embeddings: merging into the shared tensor would
    change the embeddings too, so give the head its own copy and untie it in the config."""
    from torch import nn

    from rlora_cli.adapters import MultiHeadLoRA

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, MultiHeadLoRA) or emb is None:
        return
    if head.base.weight.data_ptr() != emb.weight.data_ptr():
        return
    head.base.weight = nn.Parameter(head.base.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    _say(console, "[yellow]note:[/] the adapter changes the LM head, which shares its weight with the "
                  "input embeddings; the merged model unties them")


def _tokenizer(adapter_dir: Path, base: str, trust_remote_code: bool = False) -> Any:
    """The adapter's own tokenizer (what it was trained with) when it has one, else the base's."""
    from transformers import AutoTokenizer

    source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer from {source}: {first_line(e)}",
                        "save the adapter with its tokenizer, or pass --base with a model that has one") from None


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
                overwrite: bool = False, trust_remote_code: bool = False, console: Any = None) -> dict[str, Any]:
    """Write the adapter as a PEFT LoRA folder; returns the adapter_config.json written.

    Needs only the base's config.json (modules are built on the meta device, no weights load),
    to check the adapter fits the base and to set fan_in_fan_out for Conv1D models.
    """
    import torch
    from safetensors.torch import save_file

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
    from rlora_cli.adapters.layer import is_conv1d

    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _portable(base),
        "revision": None,
        "r": rank,
        # B'/s is exported and PEFT's own scaling lora_alpha / r' puts s back, so
        # lora_alpha = s·r' (never rslora) reproduces rlora's ΔW whatever options it trained with.
        "lora_alpha": cfg.scaling * rank,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(is_conv1d(layer.base) for layer in layers.values()),
        "target_modules": targets,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    with atomic_dir(output) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        for name in _TOKENIZER_FILES:  # the tokenizer it was trained with, for servers that read it
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, tmp / name)
    _say(console, f"[green]exported[/] a PEFT LoRA of rank {rank} over {len(layers)} modules to "
                  f"{escape(str(output))} (servers cap the rank: vLLM needs --max-lora-rank >= {rank})")
    return peft_config


def _adapter_on_meta_base(adapter_dir: Path, config: dict, cfg: AdapterConfig, base: str,
                          trust_remote_code: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The adapter's layers over a weightless (meta) copy of the base, and PEFT's target list."""
    from rlora_cli.model import meta_model

    model = meta_model(base, fix="pass --base with the base model's hub id or a folder holding its config.json",
                       trust_remote_code=trust_remote_code)
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


# ---------------------------------------------------------------- inspect


def inspect_dir(path: str | Path) -> dict[str, Any]:
    """What an adapter folder or a run folder holds, without loading any model."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: no such directory", "give an adapter folder or a run folder (OUT of rlora train)")
    if (p / CONFIG_FILE).exists():
        return {"kind": "adapter", **adapter_info(p)}
    checkpoints = sorted((c for c in p.glob("checkpoint-*") if c.is_dir() and _step(c) is not None), key=_step)
    markers = [(p / "adapter").is_dir(), bool(checkpoints), (p / "recipe.yaml").is_file(),
               (p / "metrics.jsonl").is_file()]
    if not any(markers):
        raise UserError(f"{p} holds neither an rlora adapter nor a training run",
                        "give a folder with rlora_config.json, or the OUT folder of rlora train")
    with_adapter = [c for c in checkpoints if (c / CONFIG_FILE).is_file()]
    source = p / "adapter" if (p / "adapter" / CONFIG_FILE).is_file() else (with_adapter or [None])[-1]
    return {
        "kind": "run",
        "path": str(p),
        "recipe": str(p / "recipe.yaml") if (p / "recipe.yaml").is_file() else None,
        "run_info": _json_or_none(p / "run_info.json"),
        "metrics": _metrics_summary(p / "metrics.jsonl"),
        "checkpoints": [{"step": _step(c), "path": str(c), "adapter": (c / CONFIG_FILE).is_file(),
                         "training_state": (c / "trainer_state.json").is_file()} for c in checkpoints],
        "final_adapter": (p / "adapter" / CONFIG_FILE).is_file(),
        "adapter": adapter_info(source) if source is not None else None,
    }


def adapter_info(directory: str | Path) -> dict[str, Any]:
    """One adapter's method, options, targets, counts (from the safetensors header) and exportability."""
    d = Path(directory)
    config = read_adapter_config(d)
    cfg = AdapterConfig.from_dict(config["adapter"])
    weights = d / WEIGHTS_FILE
    header = read_safetensors_header(weights)
    spec = layer_spec(cfg)
    numel = {k: _prod(v["shape"]) for k, v in header.items()}
    frozen = sum(n for k, n in numel.items() if k.rsplit(".", 1)[-1] in _FROZEN)
    modules = list(config["modules"])
    known = {"format_version", "rlora_version", "method", "adapter", "layer", "modules", "base_model",
             "base_model_hub_id", "base_dtype", "trust_remote_code"}
    return {
        "path": str(d),
        "method": cfg.type,
        "format_version": config["format_version"],
        "rlora_version": config.get("rlora_version"),
        "options": cfg.to_dict(),
        "scaling": cfg.scaling,
        "targets": cfg.to_dict()["target_modules"],
        "num_modules": len(modules),
        "module_names": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "modules": modules,
        "trainable_params": sum(numel.values()) - frozen,
        "frozen_params": frozen,
        "tensor_dtypes": sorted({v["dtype"] for v in header.values()}),
        "file_bytes": weights.stat().st_size,
        "base_model": config.get("base_model"),
        "base_model_hub_id": config.get("base_model_hub_id"),
        "base_dtype": config.get("base_dtype"),
        "trust_remote_code": bool(config.get("trust_remote_code")),
        "mergeable": cfg.mergeable,
        "not_mergeable_because": None if cfg.mergeable else
            "softmax router: ΔW depends on each token (train with adapter.router=off to merge)",
        # Rows of A' in static_factors: n·r for multilora, r (+ r for R-LoRA's compensation) else.
        "peft_rank": spec.a_heads * spec.r + (spec.r if spec.compensate else 0) if cfg.mergeable else None,
        "tokenizer": (d / "tokenizer_config.json").is_file(),
        "metadata": sorted(set(config) - known),
    }


def render_inspect(info: dict[str, Any], console: Any) -> None:
    """A rich panel per run and adapter; every value prints literally (paths, module names)."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    def grid(rows: list[tuple[str, Any]]) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan")
        table.add_column()
        for key, value in rows:
            table.add_row(key, escape(str(value)))
        return table

    if info["kind"] == "run":
        m = info["metrics"]
        steps = [str(c["step"]) for c in info["checkpoints"]]
        rows = [("recipe", info["recipe"] or "-"),
                ("metrics", f"{m['rows']} rows, last step {m['last_step']}, last loss {m['last_loss']}"
                 if m else "-"),
                ("checkpoints", ", ".join(steps) or "-"),
                ("final adapter", "yes" if info["final_adapter"] else "no (training unfinished?)")]
        console.print(Panel(grid(rows), title=escape(f"run {info['path']}"), expand=False))
        if info["adapter"] is None:
            return
        info = info["adapter"]
    o = info["options"]
    why = info["not_mergeable_because"]
    rows = [
        ("method", info["method"]),
        ("options", f"r={o['r']} heads={o['num_heads']} alpha={o['lora_alpha']} scaling={info['scaling']:g} "
                    f"dropout={o['lora_dropout']} rslora={o['use_rslora']}"
                    + (f" router={o['router']} init={o['init']} random_init={o['random_init']} "
                       f"head_dropout={o['head_dropout']}" if o.get("router") else "")),
        ("targets", f"{info['targets']} → {info['num_modules']} modules ({', '.join(info['module_names'])})"),
        ("parameters", f"{info['trainable_params']:,} trainable"
                       + (f" + {info['frozen_params']:,} frozen init factors" if info["frozen_params"] else "")
                       + f" ({', '.join(info['tensor_dtypes'])})"),
        ("base model", f"{info['base_model']} ({info['base_dtype']})"
                       + (f", hub id {info['base_model_hub_id']}" if info["base_model_hub_id"] not in
                          (None, info["base_model"]) else "")
                       + (", needs --trust-remote-code" if info["trust_remote_code"] else "")),
        ("merge/export", f"yes: PEFT LoRA of rank {info['peft_rank']}" if info["mergeable"] else f"no: {why}"),
        ("tokenizer", "saved with the adapter" if info["tokenizer"] else "from the base model"),
        ("format", f"{info['format_version']} (rlora {info['rlora_version']})"),
    ]
    console.print(Panel(grid(rows), title=escape(f"adapter {info['path']}"), expand=False))


def _metrics_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
    steps = [r["step"] for r in rows if "step" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"rows": len(rows), "bad_lines": bad, "last_step": steps[-1] if steps else None,
            "last_loss": losses[-1] if losses else None}


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _step(path: Path) -> int | None:
    tail = path.name.removeprefix("checkpoint-")
    return int(tail) if tail.isdigit() else None


# ---------------------------------------------------------------- shared checks


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """Tensor name → {dtype, shape, data_offsets} from a safetensors header, checked against the
    file size (a truncated file is caught here without reading any tensor)."""
    path = Path(path)
    fix = "the file is missing or corrupt; save the adapter again or use another checkpoint"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise UserError(f"{path}: not a safetensors file (bad header length)", fix)
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"{path}: cannot read the adapter weights ({e.strerror or e})", fix) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not a safetensors file (header is not JSON)", fix) from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (bad header)", fix)
    header.pop("__metadata__", None)
    try:
        end = 0
        for v in header.values():
            end = max(end, int(v["data_offsets"][1]))
            v["shape"] = [int(d) for d in v["shape"]]
            if not isinstance(v["dtype"], str):
                raise TypeError
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{path}: not a safetensors file (bad tensor entry)", fix) from None
    if 8 + n + end != size:
        raise UserError(f"{path}: truncated or padded ({size} bytes, the header describes {8 + n + end})", fix)
    return header


def _read(adapter_dir: str | Path) -> tuple[Path, dict[str, Any], AdapterConfig]:
    """(adapter folder, rlora_config.json, AdapterConfig); a run folder means its adapter/."""
    d = Path(adapter_dir)
    if not (d / CONFIG_FILE).exists() and (d / "adapter" / CONFIG_FILE).is_file():
        d = d / "adapter"
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
    name = dtype if dtype is not None else config.get("base_dtype") or "float32"
    if name not in _DTYPES:
        key = "--dtype" if dtype is not None else "rlora_config.json base_dtype"
        raise UserError(f"{key}: unknown dtype {name!r}", "use --dtype bfloat16, float16 or float32")
    return _DTYPES[name]


def _base_of(config: dict[str, Any], base: str | None, adapter_dir: Path) -> str:
    base = base or recorded_base(config, adapter_dir, option="--base")
    if not base:
        raise UserError("the adapter does not record its base model", "pass --base with the hub id or folder")
    return str(base)


def _portable(base: str) -> str:
    """A local base as an absolute path, so the exported adapter works from any folder."""
    import os

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


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _say(console: Any, message: str) -> None:
    if console is not None:
        console.print(message, highlight=False)
