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
training renders them (prompt and response; padding excluded), per module and averaged.

Plots in OUT: head_cosine.png (heatmaps for a few modules spread over depth), head_similarity.png
(mean off-diagonal cosine per layer, as in R-LoRA's figure), spectra.png (σ_k/σ_1 and effective
rank per layer) and, with --recipe, router_usage.png (tasks × heads). With two adapters each
plot shows both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlora_cli.adapters import ROUTER_METHODS, AdapterConfig, LayerSpec, MultiHeadLoRA
from rlora_cli.errors import UserError

HEATMAP_MODULES = 4  # head-cosine heatmaps drawn per adapter, evenly spread over depth


# ------------------------------------------------------------------------------- the command


def analyze(adapter: str | Path, other: str | Path | None = None, *, recipe: str | Path | None = None,
            output: str | Path = "analysis", limit: int | None = None, batch_size: int = 8,
            trust_remote_code: bool = False, console: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Analyse one adapter (or compare two); writes OUT/analysis.json (+ analysis_2.json) and PNGs.

    Returns (analysis of `adapter`, analysis of `other` or None). Bad input raises UserError
    before any model is loaded. Only `recipe` loads the base model (the rest reads the adapter
    files alone), so only then does a base with its own code need `trust_remote_code`.
    """
    from rich.console import Console
    from rich.markup import escape

    from rlora_cli.checkpoint import check_output_dir, check_remote_code, read_adapter_config
    from rlora_cli.files import atomic_write_text
    from rlora_cli.runs import adapter_dir

    console = console or Console()
    check_output_dir(output, "--output")
    dirs = [Path(adapter_dir(str(d))) for d in (adapter, other) if d is not None]
    configs = [read_adapter_config(d) for d in dirs]
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
    results = [analyze_adapter(d) for d in dirs]
    if recipe is not None:
        held_out, templates, max_length, default = _held_out(recipe, limit)
        for d, config, result in zip(dirs, configs, results):
            if not AdapterConfig.from_dict(config["adapter"]).has_router:
                console.print(f"[yellow]note:[/] {escape(str(d))} has no softmax router; no router usage for it")
                continue
            result["router_usage"] = _usage_for(d, held_out, templates, max_length, default, batch_size, console,
                                                trust_remote_code)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for name, result in zip(("analysis.json", "analysis_2.json"), results):
        atomic_write_text(out / name, json.dumps(result, indent=2) + "\n")
    labels = _labels(dirs, configs)
    plots = write_plots(dict(zip(labels, results)), out)
    _print_summary(dict(zip(labels, results)), console)
    console.print(f"analysis written to {escape(str(out))} ({', '.join(p.name for p in plots) or 'no plots'})")
    return results[0], (results[1] if len(results) > 1 else None)


def _labels(dirs: list[Path], configs: list[dict[str, Any]]) -> list[str]:
    names = [f"{c['method']} ({d.parent.name if d.name == 'adapter' else d.name})" for d, c in zip(dirs, configs)]
    return names if len(set(names)) == len(names) else [f"{n} #{i + 1}" for i, n in enumerate(names)]


def _held_out(recipe_path: str | Path, limit: int | None) -> tuple[dict, dict[str, str], int, str]:
    from rlora_cli.data.pipeline import load_splits
    from rlora_cli.recipe.load import load_recipe

    recipe = load_recipe(recipe_path)
    held_out = {task: val[:limit] for task, (_, val) in load_splits(recipe, with_train=False).items() if val}
    if not held_out:
        raise UserError(f"{recipe_path}: no task has held-out rows", "set data.datasets[].val_size > 0")
    templates = {d.name: d.template for d in recipe.data.datasets}
    return held_out, templates, recipe.data.max_length, recipe.model.name_or_path


def _usage_for(directory: Path, held_out: dict, templates: dict[str, str], max_length: int, default: str,
               batch_size: int, console: Any, trust_remote_code: bool = False) -> dict[str, Any]:
    from rlora_cli.eval.run import load_eval_model
    from rlora_cli.report.common import progress_bar

    model, tokenizer, _ = load_eval_model(None, str(directory), console=console, default=default,
                                          trust_remote_code=trust_remote_code)
    total = sum(len(v) for v in held_out.values())
    with progress_bar(console, total, f"router usage: {directory}") as advance:
        return router_usage(model, tokenizer, held_out, templates=templates, max_length=max_length,
                            batch_size=batch_size, progress=advance)


# ------------------------------------------------------------------------- layers from a file


def saved_layers(directory: str | Path) -> tuple[dict[str, Any], dict[str, MultiHeadLoRA]]:
    """(rlora_config.json, {module path: MultiHeadLoRA}) rebuilt from the adapter files alone.

    Each layer wraps a weightless (meta-device) Linear: enough for `static_factors`,
    `delta_weight` and `router_weights`, which never read the base weight.
    """
    from rlora_cli.checkpoint import WEIGHTS_FILE, read_adapter_config, read_weights

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
    from rlora_cli.runs import adapter_dir

    config, layers = saved_layers(adapter_dir(str(directory)))
    return {"method": config["method"],
            "modules": {name: analyze_layer(layer, config["method"]) for name, layer in layers.items()}}


@torch.no_grad()
def analyze_layer(layer: MultiHeadLoRA, method: str) -> dict[str, Any]:
    """Head cosine matrix, its mean off-diagonal, ΔW's singular values, top-1 energy, effective rank."""
    heads = head_layers(layer)
    if layer.spec.shared_a and layer.spec.num_heads > 1:  # hydralora/rlora: the B heads themselves
        B = layer.rlora_B.detach().double()
        vectors = B.view(B.shape[0], layer.spec.num_heads, layer.spec.r).transpose(0, 1).reshape(len(heads), -1)
        gram = vectors @ vectors.t()
    else:  # multilora: ΔW_i = s·g_i·B_i·A_i (and lora's one head)
        gram = delta_gram([h.static_factors() for h in heads])
    cos = cosine_matrix(gram)
    sv = singular_values(uniform_layer(layer))
    out: dict[str, Any] = {"head_cosine": cos, "mean_offdiag_cosine": mean_offdiag(cos),
                           "singular_values": sv}
    if method in ROUTER_METHODS:
        out["head_singular_values"] = [singular_values(h) for h in heads]
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


# --------------------------------------------------------------------------- router usage


@torch.no_grad()
def router_usage(model: nn.Module, tokenizer: Any, examples: dict[str, list], *,
                 templates: dict[str, str] | None = None, max_length: int | None = None,
                 batch_size: int = 8, progress: Any = None) -> dict[str, dict[str, Any]]:
    """{task: {"mean": [n], "per_module": {path: [n]}}}: mean ω(x) of each head over every
    non-padding token of the task's examples, tokenized as training does. Forward hooks on
    each adapted module call its `router_weights` on the module's own input."""
    from rlora_cli.adapters import adapter_layers
    from rlora_cli.data.pipeline import tokenize_example

    layers = {name: m for name, m in adapter_layers(model).items() if m.spec.gate == "router"}
    if not layers:
        raise UserError("this model has no softmax-router adapters", "load a hydralora/rlora adapter")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    current: dict[str, Any] = {}
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def fn(module: MultiHeadLoRA, args: tuple, output: Any) -> None:
            w = module.router_weights(args[0]).double()  # [B, T, n]
            sums[name] = sums[name] + (w * current["mask"][..., None]).sum((0, 1))
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    result: dict[str, dict[str, Any]] = {}
    try:
        for task, rows in examples.items():
            template = (templates or {}).get(task, "default")
            ids = [tokenize_example(ex, tokenizer, template=template, max_length=max_length).input_ids
                   for ex in rows]
            for name, m in layers.items():
                sums[name] = torch.zeros(m.spec.num_heads, dtype=torch.float64, device=device)
            tokens = 0
            for start in range(0, len(ids), max(1, batch_size)):
                batch = ids[start:start + batch_size]
                width = max(len(x) for x in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for b, x in enumerate(batch):  # right padding; padded positions are masked out
                    input_ids[b, :len(x)], mask[b, :len(x)] = torch.tensor(x), 1
                current["mask"] = mask.to(device, torch.float64)
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
                tokens += int(mask.sum())
                if progress is not None:
                    progress(len(batch))
            if tokens:
                per_module = {name: (s / tokens).tolist() for name, s in sums.items()}
                n = len(next(iter(per_module.values())))
                mean = [sum(v[h] for v in per_module.values()) / len(per_module) for h in range(n)]
                result[task] = {"mean": mean, "per_module": per_module}
    finally:
        for h in handles:
            h.remove()
    return result


# ------------------------------------------------------------------------------------ plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, *, tight: bool = True) -> Path:
    """Write through a temporary sibling. A colorbar shared by several axes does not survive
    tight_layout, so those figures are saved with a tight bounding box instead."""
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    if tight:
        fig.tight_layout()
    fig.savefig(tmp, dpi=120, bbox_inches=None if tight else "tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def layer_index(module: str) -> tuple[int | None, str]:
    """(layer number, module kind) of a path: model.layers.3.mlp.up_proj -> (3, 'mlp.up_proj')."""
    m = re.search(r"\.(\d+)\.", module)
    return (int(m.group(1)), module[m.end():]) if m else (None, module)


def write_plots(analyses: dict[str, dict[str, Any]], out: str | Path) -> list[Path]:
    """Every plot the analyses support; `analyses` maps a label to an analysis dict."""
    out = Path(out)
    written = [plot_head_cosine(analyses, out / "head_cosine.png"),
               plot_head_similarity(analyses, out / "head_similarity.png"),
               plot_spectra(analyses, out / "spectra.png"),
               plot_router_usage(analyses, out / "router_usage.png")]
    return [p for p in written if p is not None]


def _multi_head(analyses: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: a for k, a in analyses.items() if any(len(m["head_cosine"]) > 1 for m in a["modules"].values())}


def plot_head_cosine(analyses: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """Heatmaps of the head cosine matrix for a few modules spread over depth, one row per adapter."""
    analyses = _multi_head(analyses)
    if not analyses:
        return None
    plt = _plt()
    rows = {}
    for label, a in analyses.items():
        names = sorted(a["modules"], key=lambda m: (layer_index(m)[0] or 0, m))
        k = min(HEATMAP_MODULES, len(names))
        rows[label] = [names[round(i * (len(names) - 1) / max(k - 1, 1))] for i in range(k)]
    cols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 3.0 * len(rows)), squeeze=False)
    for r, (label, names) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(names):
                ax.axis("off")
                continue
            matrix = analyses[label]["modules"][names[c]]["head_cosine"]
            cos = [[float("nan") if x is None else x for x in row] for row in matrix]
            im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
            for i, row in enumerate(cos):
                for j, x in enumerate(row):
                    ax.text(j, i, "-" if math.isnan(x) else f"{x:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if not math.isnan(x) and abs(x) > 0.6 else "black")
            ax.set_title(f"{label}\n{names[c]}", fontsize=7)
            ax.set_xticks(range(len(cos)))
            ax.set_yticks(range(len(cos)))
    fig.colorbar(im, ax=axes, shrink=0.6, label="cosine")
    fig.suptitle("Head similarity (cosine of flattened heads)", fontsize=10)
    return _save(fig, Path(path), tight=False)


def plot_head_similarity(analyses: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """Mean off-diagonal head cosine per layer, one line per adapter and module kind (R-LoRA Fig.)."""
    analyses = _multi_head(analyses)
    if not analyses:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    styles = ["-", "--", ":", "-."]
    for a_i, (label, a) in enumerate(analyses.items()):
        kinds: dict[str, list[tuple[int, float]]] = {}
        for name, m in a["modules"].items():
            layer, kind = layer_index(name)
            if layer is not None and m["mean_offdiag_cosine"] is not None:
                kinds.setdefault(kind, []).append((layer, m["mean_offdiag_cosine"]))
        for k_i, (kind, points) in enumerate(sorted(kinds.items())):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, styles[a_i % len(styles)], marker="o", markersize=3, color=f"C{k_i}",
                    label=f"{label}: {kind}")
    ax.set(xlabel="layer", ylabel="mean off-diagonal cosine", title="Head similarity per layer")
    ax.axhline(0, color="grey", lw=0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, Path(path))


def plot_spectra(analyses: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Left: σ_k/σ_1 of ΔW (median over modules, 10–90% band) per adapter; right: effective rank per layer."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, a) in enumerate(analyses.items()):
        spectra = [[s / m["singular_values"][0] for s in m["singular_values"]]
                   for m in a["modules"].values() if m["singular_values"] and m["singular_values"][0] > 0]
        if spectra:
            k = max(len(s) for s in spectra)
            cols = torch.tensor([s + [0.0] * (k - len(s)) for s in spectra])
            xs = list(range(1, k + 1))
            left.plot(xs, cols.median(0).values.tolist(), marker="o", markersize=3, color=f"C{i}", label=label)
            left.fill_between(xs, cols.quantile(0.1, 0).tolist(), cols.quantile(0.9, 0).tolist(),
                              color=f"C{i}", alpha=0.2)
        per_layer: dict[int, list[float]] = {}
        for name, m in a["modules"].items():
            layer, _ = layer_index(name)
            if layer is not None and m["effective_rank"] is not None:
                per_layer.setdefault(layer, []).append(m["effective_rank"])
        if per_layer:
            xs = sorted(per_layer)
            right.plot(xs, [sum(per_layer[x]) / len(per_layer[x]) for x in xs], marker="o", markersize=3,
                       color=f"C{i}", label=label)
    left.set(xlabel="index k", ylabel="σ_k / σ_1", title="ΔW singular values (normalised)")
    right.set(xlabel="layer", ylabel="effective rank exp(H(σ/Σσ))", title="Effective rank of ΔW per layer")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_router_usage(analyses: dict[str, dict[str, Any]], path: str | Path) -> Path | None:
    """Heatmap tasks × heads of the mean routing weight, one panel per adapter that has it."""
    usable = {k: a["router_usage"] for k, a in analyses.items() if a.get("router_usage")}
    if not usable:
        return None
    plt = _plt()
    heads = max(len(task["mean"]) for u in usable.values() for task in u.values())
    tasks_n = max(len(u) for u in usable.values())
    fig, axes = plt.subplots(1, len(usable), figsize=((2 + 0.9 * heads) * len(usable), 1.5 + 0.45 * tasks_n),
                             squeeze=False)
    for ax, (label, usage) in zip(axes[0], usable.items()):
        tasks = list(usage)
        grid = [usage[t]["mean"] for t in tasks]
        n = len(grid[0])
        ax.imshow(grid, vmin=0, vmax=max(2.0 / n, max(max(r) for r in grid)), cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, x in enumerate(row):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(n), [f"head {j}" for j in range(n)], fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_title(f"{label}\nmean ω over held-out tokens", fontsize=8)
    return _save(fig, Path(path))


def _print_summary(analyses: dict[str, dict[str, Any]], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="rlora analyze (means over modules)")
    for col in ("adapter", "modules", "head cosine (off-diag)", "effective rank", "top-1 energy"):
        table.add_column(col, justify="left" if col == "adapter" else "right")
    for label, a in analyses.items():
        mods = a["modules"].values()
        keys = ("mean_offdiag_cosine", "effective_rank", "top1_energy")
        table.add_row(escape(label), str(len(a["modules"])), *(_mean_str([m[k] for m in mods]) for k in keys))
    console.print(table)


def _mean_str(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.4f}" if values else "-"
