"""The PEFT LoRA folder format: what `rlora export --format peft` and the per-task folds write.

    tensors, rank = peft_tensors(layers)                      # A' and B'/s of every module
    write_peft(folder, tensors, make_peft_config(base, rank, s, targets, layers), adapter_dir)

The factors come from `MultiHeadLoRA.static_factors()`, the one formula for ΔW (a routed layer
with a task's fixed head mixture). PEFT, vLLM and TGI load the folder as a plain LoRA: B'/s is
written and lora_alpha = s·r' puts s back, whatever options the adapter trained with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rlora_cli.adapters import MultiHeadLoRA
from rlora_cli.adapters.layer import is_conv1d
from rlora_cli.card import model_card
from rlora_cli.errors import UserError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "chat_template.jinja", "chat_template.json")


def peft_tensors(layers: dict[str, MultiHeadLoRA],
                 mixtures: dict[str, list[float]] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT's lora_A/lora_B tensors (A' and B'/s, float32 or wider, on the CPU) and their rank.
    `mixtures` fixes the head mixture of each routed module (a task's fold)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        mixture = torch.tensor(mixtures[name], dtype=torch.float64) if mixtures is not None else None
        B, A = layer.static_factors(mixture)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise UserError(f"the adapter of {name} holds non-finite values",
                            "the adapter is corrupt or training diverged; use an earlier checkpoint")
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous().cpu()
        # PEFT applies s itself (make_peft_config's lora_alpha)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (B / layer.spec.scaling).contiguous().cpu()
    rank = max(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
    return tensors, rank


def write_peft(folder: Path, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any],
               adapter_dir: Path, fold: dict[str, Any] | None = None) -> None:
    """A PEFT adapter folder's files, its model card (README.md, naming the task's `fold` when it
    is one) and the tokenizer it was trained with (servers read it)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    (folder / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(adapter_dir, library="peft", fold=fold))
    for name in _TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, folder / name)


def make_peft_config(base: str, rank: int, scaling: float, targets: list[str],
                     layers: dict[str, MultiHeadLoRA]) -> dict[str, Any]:
    """adapter_config.json for `peft_tensors`; fan_in_fan_out for Conv1D (GPT-2 style) bases."""
    return _peft_config(base, rank, scaling, targets, any(is_conv1d(layer.base) for layer in layers.values()))


def _peft_config(base: str, rank: int, scaling: float, targets: list[str],
                 fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT's adapter_config.json for factors A' and B'/s of rank `rank`."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": portable(base),
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


def peft_targets(model: Any, modules: list[str]) -> list[str]:
    """Short names (q_proj, …) when they pick exactly the wrapped modules, else the full paths.

    PEFT wraps every module whose name ends with a target; an adapter on some layers only must
    list full paths, or PEFT would add (zero) LoRA layers elsewhere and warn about missing keys
    (or fail on a same-named module that is not a Linear).
    """
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    same_named = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in short}
    return short if same_named == set(modules) else sorted(modules)


def portable(base: str) -> str:
    """A local base as an absolute path, so the exported adapter works from any folder."""
    return os.path.abspath(base) if Path(base).expanduser().is_dir() else base
