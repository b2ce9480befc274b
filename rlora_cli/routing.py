"""How a softmax router spreads a task's tokens over the heads: the mean routing weights ω̄.

    usage = router_usage(model, tokenizer, {"facts": examples}, templates={"facts": "default"})
    usage["facts"]["mean"]                 # [n]: ω̄ averaged over the adapted modules
    usage["facts"]["per_module"][path]     # [n]: ω̄ of one module

Every example is rendered and tokenized as training does (`data.tokenize_example`: prompt and
response), batched with right padding, and every non-padding token counts once. Forward hooks on
each routed `MultiHeadLoRA` call its `router_weights` on the module's own input, so the numbers
are those of the forward pass itself. `rlora analyze --recipe` reports them; per-task folding
(`fold.py`) fixes them as the head mixture of a task's static adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlora_cli.adapters import MultiHeadLoRA, adapter_layers
from rlora_cli.data.packing import pad_batch, pad_id
from rlora_cli.data.pipeline import tokenize_example
from rlora_cli.errors import UserError


@dataclass(frozen=True)
class Usage:
    """One task's mean routing weights and what they were measured over."""

    per_module: dict[str, list[float]]
    """Module path → ω̄ [n] over the task's tokens."""
    examples: int
    tokens: int
    """Non-padding tokens counted (prompt and response)."""

    @property
    def mean(self) -> list[float]:
        """ω̄ averaged over the modules (each module counts once)."""
        rows = list(self.per_module.values())
        return [sum(col) / len(rows) for col in zip(*rows)]


@torch.no_grad()
def router_usage(model: nn.Module, tokenizer: Any, examples: dict[str, list], *,
                 templates: dict[str, str] | None = None, max_length: int | None = None,
                 batch_size: int = 8, progress: Any = None) -> dict[str, dict[str, Any]]:
    """{task: {"mean": [n], "per_module": {path: [n]}}}: mean ω(x) of each head over every
    non-padding token of the task's examples; a task without tokens is left out."""
    usage = measure_usage(model, tokenizer, examples, templates=templates, max_length=max_length,
                          batch_size=batch_size, progress=progress)
    return {task: {"mean": u.mean, "per_module": u.per_module} for task, u in usage.items()}


@torch.no_grad()
def measure_usage(model: nn.Module, tokenizer: Any, examples: dict[str, list], *,
                  templates: dict[str, str] | None = None, max_length: int | None = None,
                  batch_size: int = 8, progress: Any = None) -> dict[str, Usage]:
    """{task: Usage} for every task with at least one token (what `router_usage` reports)."""
    layers = {name: m for name, m in adapter_layers(model).items() if m.spec.gate == "router"}
    if not layers:
        raise UserError("this model has no softmax-router adapters", "load a hydralora/rlora adapter")
    mask: dict[str, torch.Tensor] = {}  # the current batch's attention mask, read by the hooks
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def fn(module: MultiHeadLoRA, args: tuple, output: Any) -> None:
            w = module.router_weights(args[0]).double()  # [B, T, n]
            sums[name] = sums[name] + (w * mask["now"].to(w.device)[..., None]).sum((0, 1))
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    result: dict[str, Usage] = {}
    try:
        for task, rows in examples.items():
            template = (templates or {}).get(task, "default")
            ids = [tokenize_example(ex, tokenizer, template=template, max_length=max_length).input_ids
                   for ex in rows]
            for name, m in layers.items():
                sums[name] = torch.zeros(m.spec.num_heads, dtype=torch.float64, device=m.rlora_A.device)
            tokens = _forward_batches(model, ids, pad_id(tokenizer), batch_size, mask, progress)
            if tokens:
                means = {name: (s / tokens).tolist() for name, s in sums.items()}
                result[task] = Usage(means, len(rows), tokens)
    finally:
        for h in handles:
            h.remove()
    return result


def _forward_batches(model: nn.Module, ids: list[list[int]], pad: int, batch_size: int,
                     mask: dict[str, torch.Tensor], progress: Any) -> int:
    """Run the model over `ids` in right-padded batches; returns the non-padding tokens seen."""
    device = next(model.parameters()).device
    tokens = 0
    for start in range(0, len(ids), max(1, batch_size)):
        batch = ids[start:start + batch_size]
        padded = pad_batch(batch, pad)  # padded positions are masked out of the sums
        attention = padded["attention_mask"].to(device)
        mask["now"] = attention.to(torch.float64)
        model(input_ids=padded["input_ids"].to(device), attention_mask=attention)
        tokens += int(attention.sum())
        if progress is not None:
            progress(len(batch))
    return tokens


def entropy(weights: list[float]) -> float:
    """Shannon entropy of a head mixture in nats: 0 for one head, ln(n) for the uniform mixture."""
    return -sum(w * math.log(w) for w in weights if w > 0)
