"""Put adapters into a model, find them again, and fold them out.

`inject_adapters` wraps the matched Linear/Conv1D modules in `MultiHeadLoRA` and freezes
everything that is not an `rlora_*` tensor; `merge_adapters` folds static-gate adapters back into
the base weights and unwraps, leaving a plain Hugging Face model.

A quantized base (bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear, so they are found
like any Linear) stores its weight as integers: its adapters default to float32, as over a
half-precision base, and it must be dequantized (`rlora_cli/quant.py`) before a merge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from rlora_cli.errors import UserError

from .layer import PREFIX, MultiHeadLoRA, is_conv1d, linear_shape
from .methods import AdapterConfig, layer_spec


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_quantized(module: nn.Module) -> bool:
    """A base whose weight is stored as integers (bitsandbytes' 4-bit and 8-bit Linears)."""
    weight = getattr(module, "weight", None)
    return weight is not None and not weight.is_floating_point()


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def find_targets(model: nn.Module, target_modules: tuple[str, ...] | str) -> list[str]:
    """Names of the Linear/Conv1D modules matched, with PEFT's rules.

    A list matches a module whose full name equals an entry or ends with "." + entry; a string
    is a regex matched against the full name ('all-linear': every Linear but the LM head).
    """
    head = _output_embedding(model)
    candidates = [(name, m) for name, m in model.named_modules()
                  if is_adaptable(m) and not isinstance(m, MultiHeadLoRA)]
    if target_modules == "all-linear":
        found = [name for name, m in candidates if m is not head]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise UserError(f"adapter.target_modules: {target_modules!r} is not a valid regex ({e})",
                            "give a list of module names, a valid regex, or all-linear") from None
        found = [name for name, _ in candidates if pattern.fullmatch(name)]
    else:
        found = [name for name, _ in candidates
                 if any(name == t or name.endswith("." + t) for t in target_modules)]
    if not found:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
        raise UserError(
            f"adapter.target_modules: {_show(target_modules)} matches no Linear module of this model",
            f"this model's Linear modules are named: {', '.join(names) or '(none)'}; "
            "use some of those, a regex over full names, or all-linear")
    return found


def _show(target_modules: tuple[str, ...] | str) -> str:
    return repr(target_modules) if isinstance(target_modules, str) else "[" + ", ".join(target_modules) + "]"


def inject_adapters(model: nn.Module, cfg: AdapterConfig, *, modules: Iterable[str] | None = None,
                    init: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the target modules of `model` (in place) and freeze everything but the adapters.

    `modules` names the exact modules to wrap (loading a saved adapter); otherwise
    `cfg.target_modules` picks them. With `init=False` the adapter tensors are left empty for a
    loader to fill, so loading never draws random numbers. `dtype` is the adapter tensors' dtype;
    by default fp32 over a half-precision or quantized base, else the base weight's.
    """
    if adapter_layers(model):
        raise UserError("this model already has rlora adapters",
                        "load a fresh base model, or merge the adapters first")
    if modules is None:
        names = find_targets(model, cfg.target_modules)
    else:
        names = list(modules)
        table = dict(model.named_modules())
        missing = [n for n in names if n not in table or not is_adaptable(table[n])]
        if missing:
            raise UserError(f"the adapter wraps modules this model does not have as Linear: "
                            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}",
                            "load it onto the base model it was trained on (see rlora inspect)")
    table = dict(model.named_modules())
    _check_rank(cfg.r, {name: linear_shape(table[name]) for name in names})
    spec = layer_spec(cfg)
    for name in names:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        # A quantized weight's dtype is its storage (uint8, int8): the adapter trains in float32.
        own = dtype or (torch.float32 if is_quantized(base) else None)
        layer = MultiHeadLoRA(base, spec, init=init, dtype=own)
        setattr(parent, child, layer.train(base.training))  # a new module would default to train mode
    for pname, p in model.named_parameters():
        p.requires_grad_(PREFIX in pname)
    model.rlora_config = cfg
    return model


def _check_rank(r: int, shapes: dict[str, tuple[int, int]]) -> None:
    # Checked before anything is allocated: a rank past a layer's smallest side adds no capacity,
    # and an absurd one would only fail later as an out-of-memory traceback.
    name, (d_in, d_out) = min(shapes.items(), key=lambda kv: min(kv[1]))
    if r > min(d_in, d_out):
        raise UserError(f"adapter.r: {r} is larger than {name}'s smallest dimension ({min(d_in, d_out)})",
                        f"give adapter.r <= {min(d_in, d_out)}")


def adapter_layers(model: nn.Module) -> dict[str, MultiHeadLoRA]:
    """Every adapted module by its path (the path of the Linear it wraps)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiHeadLoRA)}


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the adapted base computes in, as an adapter records it: the first wrapped
    weight's, or over a quantized base the dtype of the weights left unquantized, which is the
    dtype the quantized ones were loaded in and dequantize to."""
    weight = next(iter(adapter_layers(model).values())).base.weight
    if weight.is_floating_point():
        return weight.dtype
    return next(p.dtype for name, p in model.named_parameters()
                if p.is_floating_point() and PREFIX not in name.rsplit(".", 1)[-1])


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors (trainable ones and R-LoRA's A0/B0), keyed by full name."""
    return {k: v for k, v in model.state_dict().items() if PREFIX in k.rsplit(".", 1)[-1]}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (computed in float32, cast once) and unwrap.

    Returns the same model object, now a plain Hugging Face model. Raises UserError for softmax
    routers, whose ΔW depends on the input, before anything is changed.
    """
    layers = adapter_layers(model)
    quantized = [name for name, layer in layers.items() if is_quantized(layer.base)]
    if quantized:  # W + ΔW written into integer storage would be garbage
        raise UserError(f"{quantized[0]} is quantized; ΔW cannot be added to its integer weights",
                        "dequantize the base first (rlora_cli.quant.dequantize_model; rlora merge does)")
    deltas = {name: layer.delta_weight() for name, layer in layers.items()}  # raises first
    for name, layer in layers.items():
        delta = deltas[name]
        if not torch.isfinite(delta).all():
            raise UserError(f"the adapter of {name} holds non-finite values",
                            "the adapter is corrupt or training diverged; use an earlier checkpoint")
        w = layer.base.weight
        merged = w.to(delta.dtype) + (delta.t() if is_conv1d(layer.base) else delta)
        w.copy_(merged.to(w.dtype))
    remove_adapters(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Unwrap every adapter without folding it in: the untouched base model again."""
    for name, layer in adapter_layers(model).items():
        parent, child = _parent(model, name)
        setattr(parent, child, layer.base)
    if hasattr(model, "rlora_config"):
        del model.rlora_config
    return model


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
