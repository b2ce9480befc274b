"""A run folder as its readers see it: the adapter it holds, its checkpoints, its metrics.

    inspect_dir("runs/mixed")             # {"kind": "run", "checkpoints": [...], "adapter": {...}}
    adapter_info("runs/mixed/adapter")    # method, options, targets, counts, mergeability, card
    run_folder("runs/mixed/checkpoint-40/adapter")   # runs/mixed: the run an adapter folder is in

`rlora train` writes the folder (train/rundir.py); eval, generate, analyze, export and inspect
read it through these functions, so the folder's layout is spelled in two places only. Nothing
here loads a model: counts come from the safetensors header alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from rlora_cli.adapters import AdapterConfig, layer_spec
from rlora_cli.checkpoint import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from rlora_cli.errors import UserError

CHECKPOINT_PREFIX = "checkpoint-"  # OUT/checkpoint-<step>/, written by train/rundir.py
STATE_FILE = "trainer_state.json"  # in each complete checkpoint

RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "mixture.json", "run_info.json")  # written by train/loop.py
FROZEN = ("rlora_A0", "rlora_B0")  # R-LoRA's saved initial factors: in the file, never trained
_KNOWN_KEYS = {"format_version", "rlora_version", "method", "adapter", "layer", "modules", "base_model",
               "base_model_hub_id", "base_dtype", "trust_remote_code"}


def adapter_dir(path: str) -> str:
    """The adapter folder itself, or the adapter/ of a run folder (OUT of rlora train)."""
    p = Path(path)
    if not (p / CONFIG_FILE).exists() and (p / "adapter" / CONFIG_FILE).is_file():
        return str(p / "adapter")
    return path


def run_folder(adapter: str | Path) -> Path | None:
    """The run folder an adapter folder belongs to: RUN for RUN/adapter (when RUN holds a run's
    files) and for RUN/checkpoint-N/adapter; None for an adapter folder standing alone."""
    d = Path(adapter)
    if checkpoint_step(d.parent) is not None:
        return d.parent.parent
    if d.name == "adapter" and any((d.parent / f).is_file() for f in RUN_MARKERS):
        return d.parent
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line cut short by a crash is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# ---------------------------------------------------------------- inspect


def inspect_dir(path: str | Path) -> dict[str, Any]:
    """What an adapter folder or a run folder holds, without loading any model."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: no such directory",
                        "give an adapter folder or a run folder (OUT of rlora train)")
    if (p / CONFIG_FILE).exists():
        return {"kind": "adapter", **adapter_info(p)}
    found = (c for c in p.glob(f"{CHECKPOINT_PREFIX}*") if c.is_dir() and checkpoint_step(c) is not None)
    checkpoints = sorted(found, key=checkpoint_step)
    markers = [(p / "adapter").is_dir(), bool(checkpoints), (p / "recipe.yaml").is_file(),
               (p / "metrics.jsonl").is_file()]
    if not any(markers):
        raise UserError(f"{p} holds neither an rlora adapter nor a training run",
                        "give a folder with rlora_config.json, or the OUT folder of rlora train")
    with_adapter = [a for a in map(checkpoint_adapter, checkpoints) if a is not None]
    source = p / "adapter" if (p / "adapter" / CONFIG_FILE).is_file() else (with_adapter or [None])[-1]
    return {
        "kind": "run",
        "path": str(p),
        "recipe": str(p / "recipe.yaml") if (p / "recipe.yaml").is_file() else None,
        "run_info": _json_or_none(p / "run_info.json"),
        "metrics": _metrics_summary(p / "metrics.jsonl"),
        "checkpoints": [{"step": checkpoint_step(c), "path": str(c),
                         "adapter": checkpoint_adapter(c) is not None,
                         "training_state": (c / STATE_FILE).is_file()} for c in checkpoints],
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
    numel = {k: math.prod(v["shape"]) for k, v in header.items()}
    frozen = sum(n for k, n in numel.items() if k.rsplit(".", 1)[-1] in FROZEN)
    modules = list(config["modules"])
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
        "metadata": sorted(set(config) - _KNOWN_KEYS),
        "card": read_card(d),
    }


def checkpoint_adapter(checkpoint: Path) -> Path | None:
    """A checkpoint's adapter folder: checkpoint-N/adapter as training writes it, or the
    checkpoint folder itself when the adapter was copied there; None when it has none."""
    for d in (checkpoint / "adapter", checkpoint):
        if (d / CONFIG_FILE).is_file():
            return d
    return None


def read_card(directory: Path) -> dict[str, Any] | None:
    """The folder's model card (README.md): {path, front_matter, body}; None without one. Front
    matter that is not YAML is left in the body (front_matter None): a card never fails inspect."""
    path = Path(directory) / CARD_FILE
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    front, body = None, text
    head, sep, rest = text.partition("\n---\n") if text.startswith("---\n") else ("", "", "")
    if sep:
        try:
            front = yaml.safe_load(head.removeprefix("---\n"))
        except yaml.YAMLError:
            front = None
        if isinstance(front, dict):  # a hand-edited card may hold dates: JSON types for --json
            front, body = json.loads(json.dumps(front, default=str)), rest.lstrip("\n")
        else:
            front = None
    return {"path": str(path), "front_matter": front, "body": body}


def _metrics_summary(path: Path) -> dict[str, Any] | None:
    """Row count, unreadable lines, last step and loss of a metrics.jsonl (None when absent)."""
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


def checkpoint_step(path: Path) -> int | None:
    """The step of an OUT/checkpoint-<step> folder's name; None for any other name."""
    tail = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(tail) if path.name.startswith(CHECKPOINT_PREFIX) and tail.isdigit() else None



# ---------------------------------------------------------------- the weights file


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
        raise UserError(f"{path}: truncated or padded ({size} bytes, the header describes {8 + n + end})",
                        fix)
    return header
