"""The adapter folder format: write it, read it, load it onto a base model.

    save_adapter(model, "runs/mixed/adapter", tokenizer=tokenizer)
    load_adapter(base_model, "runs/mixed/adapter")        # in place; UserError on another base

An adapter directory holds `rlora_config.json` (format version, method, every layer option, the
wrapped module names, the base model, its dtype, whether it needs its repository's own code, and
any metadata such as prompt templates) and `rlora_adapter.safetensors` (the `rlora_*` tensors,
R-LoRA's A0/B0 included, refused on load when not finite), plus the tokenizer files when one is
given and the model card `README.md` when a card writer is (card.py). Everything is written
through `files.atomic_dir`, so a crash never leaves a half-written directory behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from torch import nn

from rlora_cli import __version__
from rlora_cli.adapters import AdapterConfig, adapter_layers, adapter_state, inject_adapters
from rlora_cli.adapters.inject import base_dtype, remove_adapters
from rlora_cli.errors import UserError
from rlora_cli.files import atomic_dir

FORMAT_VERSION = 1
CONFIG_FILE = "rlora_config.json"
WEIGHTS_FILE = "rlora_adapter.safetensors"
CARD_FILE = "README.md"  # the Hugging Face model card, written by card.py's functions


def base_model_id(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def base_record(name: str | None) -> dict[str, str | None]:
    """`base_model` as the adapter stores it: a local folder as an absolute path (so the adapter
    works from any working directory), else the hub id; `base_model_hub_id` when one is known."""
    if not name:
        return {"base_model": None, "base_model_hub_id": None}
    path = Path(name).expanduser()
    if path.is_dir():
        local = os.path.abspath(path)  # abspath, not resolve: keep the user's own (symlinked) names
        return {"base_model": local, "base_model_hub_id": _cached_hub_id(Path(local))}
    return {"base_model": name, "base_model_hub_id": name}


def _cached_hub_id(path: Path) -> str | None:
    """org/name of a folder inside the Hugging Face cache (…/models--org--name/snapshots/<sha>)."""
    for part in path.parts:
        if part.startswith("models--"):
            return "/".join(part.removeprefix("models--").split("--"))
    return None


def uses_remote_code(model: nn.Module, tokenizer: Any = None) -> bool:
    """Whether the model (or tokenizer) class came from its repository's own code, which
    transformers imports as `transformers_modules.*` only under trust_remote_code=True."""
    return any(type(obj).__module__.startswith("transformers_modules")
               for obj in (model, tokenizer) if obj is not None)


def save_adapter(model: nn.Module, directory: str | Path, *, tokenizer: Any = None,
                 metadata: dict[str, Any] | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None,
                 trust_remote_code: bool | None = None, card: Callable[[Path], str] | None = None) -> Path:
    """Write the adapter of `model` to `directory` atomically; returns the directory.

    `state_dict` (optional) is a full state dict to take the tensors from, for models whose own
    parameters are sharded (FSDP gathers a full one on the main process). `trust_remote_code`
    records that the base needs its repository's code (default: whether the loaded classes
    came from it); commands that load the base then ask for --trust-remote-code. `card` (optional)
    turns the written folder into its README.md text (card.py); it is called on the temporary
    folder, so the card lands in the same rename as the weights it describes.
    """
    model = _uncompiled(model)
    layers = adapter_layers(model)
    if not layers:
        raise UserError("this model has no rlora adapters to save", "call inject_adapters first")
    cfg: AdapterConfig = model.rlora_config
    first = next(iter(layers.values()))
    config = {
        "format_version": FORMAT_VERSION,
        "rlora_version": __version__,
        "method": cfg.type,
        "adapter": cfg.to_dict(),
        "layer": asdict(first.spec),
        "modules": list(layers),
        **base_record(base_model_id(model)),
        "base_dtype": str(base_dtype(model)).removeprefix("torch."),  # a quantized base's compute dtype
        "trust_remote_code": (uses_remote_code(model, tokenizer) if trust_remote_code is None
                              else trust_remote_code),
        **(metadata or {}),
    }
    source = adapter_state(model) if state_dict is None else state_dict
    names = adapter_state(model).keys()
    tensors = {k: source[k].detach().contiguous().cpu() for k in names}
    with atomic_dir(directory) as tmp:
        # Called through the module, so tests can make the disk "full" by patching safetensors.
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE),
                                    metadata={"format": "pt", "rlora_format": str(FORMAT_VERSION)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card(tmp))
    return Path(directory)


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The adapter's config, checked for presence, JSON and format version."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: no such adapter directory",
                        "give the folder that holds rlora_config.json")
    if not path.is_file():
        raise UserError(f"{directory} is not an rlora adapter (no {CONFIG_FILE})",
                        "give an adapter folder such as RUN/adapter or RUN/checkpoint-<step>")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})",
                        "the file is corrupt; save the adapter again") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if not isinstance(version, int) or not {"adapter", "modules"} <= set(config):
        raise UserError(f"{path}: not an rlora adapter config", "save the adapter again with rlora")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: written in adapter format {version} by a newer rlora "
                        f"(this one reads up to {FORMAT_VERSION})", "upgrade rlora: pip install -U rlora")
    return config


def load_adapter(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """Re-create the saved adapter on an untouched base model (in place; no RNG is drawn)."""
    config = read_adapter_config(directory)
    cfg = AdapterConfig.from_dict(config["adapter"])
    tensors = read_weights(Path(directory) / WEIGHTS_FILE)
    dtype = next(iter(tensors.values())).dtype if tensors else None
    inject_adapters(base_model, cfg, modules=config["modules"], init=False, dtype=dtype)
    try:
        _fill(adapter_state(base_model), tensors, Path(directory) / WEIGHTS_FILE)
    except UserError:
        remove_adapters(base_model)
        raise
    base_model.rlora_metadata = config
    return base_model


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy saved adapter tensors into a model that already has the same adapters (resume)."""
    path = Path(directory) / WEIGHTS_FILE
    _fill(adapter_state(_uncompiled(model)), read_weights(path), path)


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wraps (its parameter names carry no `_orig_mod.` prefix)."""
    return getattr(model, "_orig_mod", model)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, checked finite: a NaN would otherwise score and generate quietly."""
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (OSError, SafetensorError, RuntimeError) as e:
        raise UserError(f"{path}: cannot read the adapter weights ({e})",
                        "the file is missing or corrupt; save the adapter again or use another "
                        "checkpoint") from None
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """UserError naming the first tensor (in file order) that holds NaN or ±inf."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{path}: tensor {key} holds NaN or infinite values",
                            "training diverged or the file is corrupt; use an earlier checkpoint "
                            "(RUN/checkpoint-<step>) or train again")


@torch.no_grad()
def _fill(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path) -> None:
    check_tensors(state, tensors, path)
    for key, target in state.items():
        target.copy_(tensors[key])


WRONG_BASE_FIX = "load the adapter onto the base model it was trained on (see rlora inspect)"


def check_tensors(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path,
                  fix: str = WRONG_BASE_FIX) -> None:
    """The file's tensors must be exactly the adapter's, with the same shapes."""
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        names = ", ".join((missing or unexpected)[:3])
        raise UserError(f"{path}: {'missing' if missing else 'unexpected'} tensors ({names})",
                        "the weights do not belong to this rlora_config.json; save the adapter again")
    for key, target in state.items():
        if target.shape != tensors[key].shape:
            raise UserError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, this base "
                            f"model needs {tuple(target.shape)}", fix)


# ------------------------------------------------------------------ using a saved adapter


def recorded_base(config: dict[str, Any], directory: str | Path, *, option: str = "--model") -> str | None:
    """The base model the adapter records, as something `from_pretrained` can load from here.

    Adapters now record a local base by its absolute path. Older ones kept the path as given
    (relative to wherever training ran): it is looked for under the working directory, then
    under each folder above the adapter (a run in runs/demo/ beside .models/). A local base that
    is gone is a UserError naming `option`, the flag that names another base.
    """
    name = config.get("base_model")
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_absolute():
        if path.is_dir():
            return str(path)
        raise _base_gone(f"{path} no longer exists", config, option)
    if path.is_dir():
        return str(name)
    for root in Path(os.path.abspath(directory)).parents:
        if (root / path / "config.json").is_file():
            return str(root / path)
    if is_repo_id(str(name)):
        return str(name)
    raise _base_gone(f"{name} is not in the working folder nor above the adapter", config, option)


def is_repo_id(name: str) -> bool:
    """Whether `name` is a valid hub repository id (`name` or `owner/name`)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _base_gone(where: str, config: dict[str, Any], option: str) -> UserError:
    hub = config.get("base_model_hub_id")
    also = f" (its hub id: {option} {hub})" if hub and hub != config.get("base_model") else ""
    return UserError(f"the adapter's base model {where}",
                     f"pass {option} with the base model's folder or hub id{also}")


def check_remote_code(config: dict[str, Any], directory: str | Path, allowed: bool) -> None:
    """Refuse an adapter whose base runs its repository's own code unless the user allowed it:
    rlora never turns remote code on by itself."""
    if config.get("trust_remote_code") and not allowed:
        raise UserError(f"{directory} was trained on a model that runs its own code "
                        "(model.trust_remote_code: true)",
                        "pass --trust-remote-code if you trust that model's repository")
