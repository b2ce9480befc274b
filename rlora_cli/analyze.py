"""`rlora analyze`: what an adapter learned — head similarity, ΔW spectra, router use per task.

    rlora analyze runs/rlora --output analysis/rlora
    rlora analyze runs/rlora runs/hydralora --output analysis/rlora-vs-hydralora
    rlora analyze runs/rlora --recipe recipes/mixed.yaml --output analysis/rlora

Per adapted module (`analyze_adapter`, no base model needed: the layers are rebuilt from the
saved tensors over a weightless base):
- head_cosine: pairwise cosine similarity of the flattened heads — the B_i [d_out, r] of
  hydralora/rlora (what R-LoRA's figure shows), the ΔW_i = s·g_i·B_i·A_i of multilora — and its
  mean off-diagonal value (null with one head, or when a head is all zeros);
- singular_values of ΔW, descending, unnormalised: the first k, where k is the inner dimension
  of `static_factors()` (ΔW's rank bound; every later one is exactly 0). Router methods: ΔW of the
  uniform router (the mean head) and, as head_singular_values, of each head alone (the delta of
  a token routed entirely to that head, R-LoRA's compensation included);
- top1_energy = σ1²/Σσ² and effective_rank = exp(H(p)) with p = σ/Σσ (Roy & Vetterli 2007);
  both null for a zero ΔW.
ΔW always comes from `MultiHeadLoRA.static_factors()`, the formula merge and export use; a head
is a one-head view of the same tensors. With `--recipe` (softmax routers only), `router_usage`
is the mean routing weight of each head over every token of each task's held-out examples as
training renders them (prompt and response; padding excluded), per module and averaged
(`routing.router_usage`, which per-task folding uses too). For an adapter inside a run folder
whose metrics.jsonl rows carry the router telemetry of training (training/metrics.py),
`router_training` lists them: step, router_entropy, task_router_usage (and router_aux).

The plots in OUT (head_cosine, head_similarity, spectra, with --recipe router_usage, and from a
run's telemetry router_entropy) and the printed summary are drawn by report/analyze.py from the
returned dicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlora_cli.adapters import ROUTER_METHODS, AdapterConfig, LayerSpec, MultiHeadLoRA
from rlora_cli.checkpoint import WEIGHTS_FILE, check_remote_code, read_adapter_config, read_weights
from rlora_cli.data.pipeline import load_splits
from rlora_cli.errors import UserError
from rlora_cli.files import atomic_write_text, check_output_dir
from rlora_cli.model import load_with_adapter
from rlora_cli.recipe.load import load_recipe
from rlora_cli.report.analyze import render_analysis, write_plots
from rlora_cli.report.common import progress_bar
from rlora_cli.routing import router_usage
from rlora_cli.runs import adapter_dir, checkpoint_step, read_metrics, run_folder

# ------------------------------------------------------------------------------- the command


def analyze(adapter: str | Path, other: str | Path | None = None, *, recipe: str | Path | None = None,
            output: str | Path = "analysis", limit: int | None = None, batch_size: int = 8,
            trust_remote_code: bool = False,
            console: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Analyse one adapter (or compare two); writes OUT/analysis.json (+ analysis_2.json) and PNGs.

    Returns (analysis of `adapter`, analysis of `other` or None). Bad input raises UserError
    before any model is loaded. Only `recipe` loads the base model (the rest reads the adapter
    files alone), so only then does a base with its own code need `trust_remote_code`. With a
    `console`, shows progress and prints a summary; without one, prints nothing.
    """
    check_output_dir(output, "--output")
    dirs = [Path(adapter_dir(str(d))) for d in (adapter, other) if d is not None]
    configs = [read_adapter_config(d) for d in dirs]
    _check_options(dirs, configs, recipe, limit, batch_size, trust_remote_code)
    results = [analyze_adapter(d) for d in dirs]
    for d, result in zip(dirs, results):
        history = router_training(d)
        if history:
            result["router_training"] = history
    notes = []
    if recipe is not None:
        held_out, templates, max_length, default = _held_out(recipe, limit)
        for d, config, result in zip(dirs, configs, results):
            if not AdapterConfig.from_dict(config["adapter"]).has_router:
                notes.append(f"{d} has no softmax router; no router usage for it")
                continue
            result["router_usage"] = _usage_for(d, held_out, templates, max_length, default, batch_size,
                                                trust_remote_code, console)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for name, result in zip(("analysis.json", "analysis_2.json"), results):
        atomic_write_text(out / name, json.dumps(result, indent=2) + "\n")
    analyses = dict(zip(_labels(dirs, configs), results))
    plots = write_plots(analyses, out)
    if console is not None:
        render_analysis(analyses, out, plots, console, notes=notes)
    return results[0], (results[1] if len(results) > 1 else None)


def _check_options(dirs: list[Path], configs: list[dict[str, Any]], recipe: str | Path | None,
                   limit: int | None, batch_size: int, trust_remote_code: bool) -> None:
    """Every refusal that needs no tensors, so bad input fails before any work."""
    if recipe is not None and not AdapterConfig.from_dict(configs[0]["adapter"]).has_router:
        raise UserError(f"--recipe: the {configs[0]['method']} adapter in {dirs[0]} has no softmax router, "
                        "so there is no router usage to measure",
                        "drop --recipe, or analyze a hydralora/rlora adapter trained with router: softmax")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})", "give --limit 1 or more")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})", "give --batch-size 1 or more")
    if recipe is not None:
        for d, config in zip(dirs, configs):
            check_remote_code(config, d, trust_remote_code)


def _labels(dirs: list[Path], configs: list[dict[str, Any]]) -> list[str]:
    names = [f"{c['method']} ({d.parent.name if d.name == 'adapter' else d.name})"
             for d, c in zip(dirs, configs)]
    return names if len(set(names)) == len(names) else [f"{n} #{i + 1}" for i, n in enumerate(names)]


def _held_out(recipe_path: str | Path, limit: int | None) -> tuple[dict, dict[str, str], int, str]:
    recipe = load_recipe(recipe_path)
    held_out = {task: val[:limit] for task, (_, val) in load_splits(recipe, with_train=False).items() if val}
    if not held_out:
        raise UserError(f"{recipe_path}: no task has held-out rows", "set data.datasets[].val_size > 0")
    templates = {d.name: d.template for d in recipe.data.datasets}
    return held_out, templates, recipe.data.max_length, recipe.model.name_or_path


def _usage_for(directory: Path, held_out: dict, templates: dict[str, str], max_length: int, default: str,
               batch_size: int, trust_remote_code: bool, console: Any) -> dict[str, Any]:
    """router_usage of the adapter in `directory` over its recorded base (else the recipe's)."""
    model, tokenizer, _ = load_with_adapter(None, str(directory), default=default,
                                            trust_remote_code=trust_remote_code)
    kwargs = dict(templates=templates, max_length=max_length, batch_size=batch_size)
    if console is None:
        return router_usage(model, tokenizer, held_out, **kwargs)
    total = sum(len(v) for v in held_out.values())
    with progress_bar(console, total, f"router usage: {directory}") as advance:
        return router_usage(model, tokenizer, held_out, progress=advance, **kwargs)


ROUTER_KEYS = ("step", "router_entropy", "task_router_usage", "router_aux")


def router_training(adapter: Path) -> list[dict[str, Any]]:
    """The router telemetry logged while the run that holds `adapter` trained, one entry per
    log line that has it (a checkpoint's: up to its step); empty for an adapter outside a run
    folder or without a softmax router."""
    run = run_folder(adapter)
    path = None if run is None else run / "metrics.jsonl"
    if path is None or not path.is_file():
        return []
    last = checkpoint_step(Path(adapter).parent)
    return [{k: row[k] for k in ROUTER_KEYS if k in row} for row in read_metrics(path)
            if "router_entropy" in row and "step" in row and (last is None or row["step"] <= last)]


# ------------------------------------------------------------------------- layers from a file


def saved_layers(directory: str | Path) -> tuple[dict[str, Any], dict[str, MultiHeadLoRA]]:
    """(rlora_config.json, {module path: MultiHeadLoRA}) rebuilt from the adapter files alone.

    Each layer wraps a weightless (meta-device) Linear: enough for `static_factors`,
    `delta_weight` and `router_weights`, which never read the base weight.
    """
    config = read_adapter_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    tensors = read_weights(path)  # checked readable and finite
    spec = LayerSpec(**config["layer"])
    by_module: dict[str, dict[str, torch.Tensor]] = {m: {} for m in config["modules"]}
    for key, value in tensors.items():
        module, _, name = key.rpartition(".")
        if module not in by_module:
            raise UserError(f"{path}: tensor {key} belongs to no module listed in rlora_config.json",
                            "the weights do not belong to this config; save the adapter again")
        by_module[module][name] = value
    return config, {m: layer_from(spec, state, where=f"{path}: {m}") for m, state in by_module.items()}


def layer_from(spec: LayerSpec, state: dict[str, torch.Tensor], *, where: str = "adapter") -> MultiHeadLoRA:
    """A MultiHeadLoRA computing `spec` with exactly the given `rlora_*` tensors (no copy, no RNG)."""
    if "rlora_A" not in state or "rlora_B" not in state:
        raise UserError(f"{where}: rlora_A or rlora_B is missing", "save the adapter again")
    d_in, d_out = state["rlora_A"].shape[1], state["rlora_B"].shape[0]
    base = nn.Linear(d_in, d_out, bias=False, device="meta")
    layer = MultiHeadLoRA(base, spec, init=False, dtype=state["rlora_A"].dtype)
    missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("base.")]
    if missing or unexpected:
        raise UserError(f"{where}: {'missing' if missing else 'unexpected'} tensors "
                        f"({', '.join(missing or unexpected)})",
                        "the weights do not belong to this rlora_config.json; save the adapter again")
    return layer


def uniform_layer(layer: MultiHeadLoRA) -> MultiHeadLoRA:
    """The same heads with the router replaced by uniform 1/n weights (ΔW of the mean head)."""
    if layer.spec.gate != "router":
        return layer
    state = {k: v for k, v in _state(layer).items() if k != "rlora_router"}
    return layer_from(dataclasses.replace(layer.spec, gate="uniform"), state)


def head_layers(layer: MultiHeadLoRA) -> list[MultiHeadLoRA]:
    """One single-head view per head: its delta is that of a token routed entirely to head i
    (shared A and R-LoRA's compensation kept), or g_i·B_i·A_i for multilora."""
    spec, n, r = layer.spec, layer.spec.num_heads, layer.spec.r
    if n == 1:
        return [uniform_layer(layer)]
    state = _state(layer)
    one = dataclasses.replace(spec, num_heads=1, gate="scalar" if spec.gate == "scalar" else "uniform")
    heads = []
    for i in range(n):
        head = {k: v for k, v in state.items() if k in ("rlora_A0", "rlora_B0")}
        head["rlora_A"] = state["rlora_A"][i * r:(i + 1) * r] if not spec.shared_a else state["rlora_A"]
        head["rlora_B"] = state["rlora_B"][:, i * r:(i + 1) * r]
        if spec.gate == "scalar":
            head["rlora_gate"] = state["rlora_gate"][i:i + 1]
        heads.append(layer_from(one, head))
    return heads


def _state(layer: MultiHeadLoRA) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in layer.state_dict(keep_vars=True).items() if not k.startswith("base.")}


# ------------------------------------------------------------------------------ the numbers


def analyze_adapter(directory: str | Path) -> dict[str, Any]:
    """{"method", "modules": {path: analyze_layer(...)}} of a saved adapter (no base model loaded)."""
    config, layers = saved_layers(adapter_dir(str(directory)))
    return {"method": config["method"],
            "modules": {name: analyze_layer(layer, config["method"]) for name, layer in layers.items()}}


@torch.no_grad()
def analyze_layer(layer: MultiHeadLoRA, method: str) -> dict[str, Any]:
    """Head cosine matrix, its mean off-diagonal, ΔW's singular values, top-1 energy, effective rank."""
    heads = head_layers(layer)
    if layer.spec.shared_a and layer.spec.num_heads > 1:  # hydralora/rlora: the B heads themselves
        B = layer.rlora_B.detach().double()
        heads_first = B.view(B.shape[0], layer.spec.num_heads, layer.spec.r).transpose(0, 1)
        vectors = heads_first.reshape(len(heads), -1)
        gram = vectors @ vectors.t()
    else:  # multilora: ΔW_i = s·g_i·B_i·A_i (and lora's one head)
        gram = delta_gram([h.static_factors() for h in heads])
    cos = cosine_matrix(gram)
    sv = singular_values(uniform_layer(layer))
    out: dict[str, Any] = {"head_cosine": cos, "mean_offdiag_cosine": mean_offdiag(cos),
                           "singular_values": sv}
    if method in ROUTER_METHODS:
        out["head_singular_values"] = [singular_values(h) for h in heads]
    if layer.spec.gate == "scalar":  # multilora: zero-init gates that may not have moved
        out["gate_abs"] = layer.rlora_gate.detach().abs().double().tolist()
    out["effective_rank"] = effective_rank(sv)
    out["top1_energy"] = top1_energy(sv)
    return out


def delta_gram(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """⟨ΔW_i, ΔW_j⟩ (Frobenius, float64) of ΔW_i = B_i·A_i without building any ΔW:
    tr(A_iᵀ B_iᵀ B_j A_j) = Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ)."""
    f = [(B.double(), A.double()) for B, A in factors]
    return torch.tensor([[float(((Bi.t() @ Bj) * (Ai @ Aj.t())).sum()) for Bj, Aj in f] for Bi, Ai in f],
                        dtype=torch.float64)


def cosine_matrix(gram: torch.Tensor) -> list[list[float | None]]:
    """n×n cosine similarities from a Gram matrix of inner products; None where a head is zero."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :])
    return [[float(c) if norms[i] > 0 and norms[j] > 0 else None for j, c in enumerate(row.tolist())]
            for i, row in enumerate(cos)]


def mean_offdiag(cos: list[list[float | None]]) -> float | None:
    values = [c for i, row in enumerate(cos) for j, c in enumerate(row) if i != j and c is not None]
    return sum(values) / len(values) if values else None


def singular_values(layer: MultiHeadLoRA) -> list[float]:
    """Singular values of ΔW = B'·A' (static_factors, float32), descending, computed from the
    factors: with B' = Q_B·R_B and A'ᵀ = Q_A·R_A, ΔW's are those of the small R_B·R_Aᵀ."""
    B, A = layer.static_factors()
    B, A = B.float(), A.float()
    _, R_B = torch.linalg.qr(B)
    _, R_A = torch.linalg.qr(A.t())
    return torch.linalg.svdvals(R_B @ R_A.t()).tolist()


def effective_rank(sv: list[float]) -> float | None:
    """exp of the entropy of p = σ/Σσ (Roy & Vetterli 2007); None for a zero matrix."""
    total = sum(sv)
    if total <= 0:
        return None
    p = [s / total for s in sv if s > 0]
    return math.exp(-sum(x * math.log(x) for x in p))


def top1_energy(sv: list[float]) -> float | None:
    """σ1² / Σσ²: the share of ΔW's squared Frobenius norm in its top direction."""
    energy = sum(s * s for s in sv)
    return sv[0] ** 2 / energy if energy > 0 else None
