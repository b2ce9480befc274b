"""`rlora eval`: benchmarks and the recipe's held-out tasks, one results-file shape for all.

    rlora eval --task mmlu --model Qwen/Qwen2.5-0.5B --adapter runs/mixed/adapter --limit 50
    rlora eval --task bbh --data bigbench/ --shots 3 --output bbh.json
    rlora eval --task recipe --recipe recipes/mixed.yaml --adapter runs/mixed/adapter
    rlora eval --backend lm-eval --task hellaswag --model runs/merged
    rlora eval compare base.json tuned.json --plot delta.png

`evaluate(...)` loads the data first (bad input fails before a model is loaded), then the model
(base + adapter, or a merged folder), scores every task with `scoring.py`, prints a table and
writes the results file (`results_dict`). `compare` reads two results files.
Scoring and data live in `scoring.py` and `evalsets.py`; the recipe task in `eval_recipe.py`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rlora_cli.data import bigbench
from rlora_cli.errors import UserError
from rlora_cli.runs import adapter_dir

TASKS = ("mmlu", "bbh", "recipe")
BACKENDS = ("rlora", "lm-eval")
LM_EVAL_HINT = "install it with: pip install 'rlora[eval]' (lm-evaluation-harness with its hf backend)"


def evaluate(task: str, *, model: str | None = None, adapter: str | None = None,
             data: str | None = None, shots: int | None = None, limit: int | None = None,
             subjects: list[str] | None = None, recipe: str | None = None, batch_size: int = 8,
             backend: str = "rlora", dtype: str = "auto", output: str | None = None,
             trust_remote_code: bool = False, console: Any = None) -> dict[str, Any]:
    """Run one evaluation and return the results dict (also written to `output` when given)."""
    from rich.console import Console
    from rich.markup import escape

    from rlora_cli.checkpoint import check_output_file

    console = console or Console()
    start = time.perf_counter()
    if output:
        check_output_file(output, "--output")  # now, not after the whole evaluation
    adapter = adapter_dir(adapter) if adapter else None
    if task == "recipe" and not recipe and adapter and (Path(adapter).parent / "recipe.yaml").is_file():
        recipe = str(Path(adapter).parent / "recipe.yaml")  # RUN/adapter: the run's resolved recipe
    _check_args(task, backend, shots, limit, batch_size, data, recipe)
    if backend == "lm-eval":
        _import_lm_eval()
        names = [t.strip() for t in task.split(",") if t.strip()]
        lm, tokenizer, base = load_eval_model(model, adapter, dtype=dtype, console=console,
                                              trust_remote_code=trust_remote_code)
        tasks = lm_eval_tasks(run_lm_eval(lm, tokenizer, names, shots=shots, limit=limit,
                                          batch_size=batch_size))
    else:
        prepared = _prepare(task, data, shots, limit, subjects, recipe)
        lm, tokenizer, base = load_eval_model(model, adapter, dtype=dtype, console=console,
                                              default=prepared.get("model"), trust_remote_code=trust_remote_code)
        tasks = _run(task, prepared, lm, tokenizer, batch_size, console)
    results = results_dict(task, base, adapter, default_shots(task, shots, backend), limit,
                           time.perf_counter() - start, tasks)
    print_results(results, console)
    if output:
        from rlora_cli.files import atomic_write_text
        atomic_write_text(output, json.dumps(results, indent=2) + "\n")
        console.print(f"results written to {escape(str(output))}")
    return results


def default_shots(task: str, shots: int | None, backend: str = "rlora") -> int | None:
    """The shot count used: --shots, else 5 for MMLU and 0 for BIG-bench (lm-eval: each task's
    default); None for the recipe task, which has no shots."""
    if backend == "lm-eval":
        return shots
    if task == "recipe":
        return None
    return shots if shots is not None else {"mmlu": 5, "bbh": 0}.get(task)


def _check_args(task: str, backend: str, shots: int | None, limit: int | None, batch_size: int,
                data: str | None, recipe: str | None) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
    if backend == "rlora" and task not in TASKS:
        raise UserError(f"unknown task {task!r}", f"use --task {'|'.join(TASKS)}, or --backend lm-eval "
                        "--task NAME for an lm-evaluation-harness task")
    for name, value, low in (("--shots", shots, 0), ("--limit", limit, 1), ("--batch-size", batch_size, 1)):
        if value is not None and value < low:
            raise UserError(f"{name} must be at least {low} (got {value})", f"give {name} {low} or more")
    if backend == "rlora" and task == "bbh" and not data:
        raise UserError("--task bbh needs --data", "give a BIG-bench task.json, a BBH .json, or a folder of them")
    if backend == "rlora" and task == "recipe" and not recipe:
        raise UserError("--task recipe needs --recipe",
                        "give the recipe YAML, or --adapter RUN/adapter of a run that holds recipe.yaml")


def _prepare(task: str, data: str | None, shots: int | None, limit: int | None,
             subjects: list[str] | None, recipe: str | None) -> dict[str, Any]:
    """Load and check the task's data before any model is loaded."""
    from rlora_cli.eval import benchmarks as evalsets

    n_shots = default_shots(task, shots) or 0
    if task == "mmlu":
        return {"mmlu": evalsets.load_mmlu(data, subjects, n_shots), "shots": n_shots, "limit": limit}
    if task == "bbh":
        files = bigbench.bigbench_files(data)  # type: ignore[arg-type]
        tasks = {name: bigbench.load_bigbench(path) for name, path in files.items()}
        for name, t in tasks.items():
            if len(t["examples"]) <= n_shots:
                raise UserError(f"--shots {n_shots} leaves no example of task {name} to score "
                                f"({len(t['examples'])} examples)", "lower --shots")
        return {"bbh": tasks, "shots": n_shots, "limit": limit}
    from rlora_cli.eval.recipe_tasks import prepare_recipe
    return prepare_recipe(recipe, limit)  # type: ignore[arg-type]


def _run(task: str, prepared: dict[str, Any], model: Any, tokenizer: Any, batch_size: int,
         console: Any) -> dict[str, dict[str, Any]]:
    if task == "mmlu":
        return run_mmlu(model, tokenizer, prepared["mmlu"], shots=prepared["shots"],
                        limit=prepared["limit"], batch_size=batch_size, console=console)
    if task == "bbh":
        return run_bigbench(model, tokenizer, prepared["bbh"], shots=prepared["shots"],
                            limit=prepared["limit"], batch_size=batch_size, console=console)
    from rlora_cli.eval.recipe_tasks import run_recipe
    return run_recipe(model, tokenizer, prepared, batch_size=batch_size, console=console)


# ------------------------------------------------------------------------------ the model


def load_eval_model(model: str | None, adapter: str | None, *, dtype: str = "auto", console: Any = None,
                    default: str | None = None, trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """(model, tokenizer, base name): the base is `model`, else the adapter's recorded base, else
    `default` (the recipe's model); the adapter is applied on it. An adapter whose base runs its
    own code needs `trust_remote_code` (--trust-remote-code)."""
    import torch

    from rlora_cli.checkpoint import check_remote_code, load_adapter, read_adapter_config
    from rlora_cli.model import load_model, load_tokenizer

    config = read_adapter_config(adapter) if adapter else {}
    if adapter:
        check_remote_code(config, adapter, trust_remote_code)
    recorded = _recorded(config, adapter, strict=not model)
    base = model or recorded or default
    if not base:
        raise UserError("no model to evaluate" + (f": {adapter} records no base model" if adapter else ""),
                        "give --model ID_OR_PATH (a hub id, a local folder, or a merged model)")
    if adapter and model and recorded and not _same_model(model, recorded):
        if console is not None:
            from rich.markup import escape

            note = f"adapter {adapter} was trained on {recorded}, applying it to {model}"
            console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
    lm, tokenizer = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code,
                               device="cuda" if torch.cuda.is_available() else None)
    if adapter:
        load_adapter(lm, adapter)  # UserError on a shape mismatch: the adapter is for another base
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(adapter, trust_remote_code=trust_remote_code)
    lm.eval()
    return lm, tokenizer, base


def _recorded(config: dict[str, Any], adapter: str | None, *, strict: bool) -> str | None:
    """The adapter's base, found from here. With --model given (`strict` False) the record only
    feeds a warning, so a base that has moved away is no error."""
    from rlora_cli.checkpoint import recorded_base

    if not adapter:
        return None
    try:
        return recorded_base(config, adapter, option="--model")
    except UserError:
        if strict:
            raise
        return config.get("base_model")


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


# -------------------------------------------------------------------------------- the tasks


def run_mmlu(model: Any, tokenizer: Any, subjects: dict[str, tuple[list, list]], *, shots: int = 5,
             limit: int | None = None, batch_size: int = 8, console: Any = None) -> dict[str, dict]:
    """{subject: {accuracy, n}}: the letter among " A".." D" with the highest log-likelihood."""
    from rlora_cli.eval.benchmarks import LETTERS, mmlu_prompt
    from rlora_cli.eval.scoring import loglikelihoods, task_record
    from rlora_cli.report.common import progress_bar

    requests, gold = [], []
    for subject, (dev, test) in subjects.items():
        for question in test[:limit]:
            requests.append((mmlu_prompt(subject, question, dev[:shots]), [f" {c}" for c in LETTERS]))
            gold.append((subject, question["answer"]))
    with progress_bar(console, len(requests), "MMLU") as advance:
        scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=advance)
    correct: dict[str, list[bool]] = {s: [] for s in subjects}
    for (subject, answer), cand in zip(gold, scores):
        correct[subject].append(_argmax([s.logprob for s in cand]) == answer)
    return {s: task_record(c) for s, c in correct.items()}


def run_bigbench(model: Any, tokenizer: Any, tasks: dict[str, dict], *, shots: int = 0,
                 limit: int | None = None, batch_size: int = 8, console: Any = None) -> dict[str, dict]:
    """{task: {accuracy, n, multiple_choice, exact_match}} for BIG-bench/BBH task files."""
    from rlora_cli.data.bigbench import bigbench_choices, bigbench_prompt, bigbench_targets
    from rlora_cli.eval.scoring import greedy_generate, loglikelihoods, task_record
    from rlora_cli.report.common import progress_bar

    mc, gen = [], []  # (task, example, prompt)
    for name, task in tasks.items():
        examples = task["examples"]
        for ex in examples[shots:][:limit]:
            (mc if bigbench_choices(ex) else gen).append((name, ex, bigbench_prompt(task, ex, examples[:shots])))
    correct: dict[str, list[bool]] = {name: [] for name in tasks}
    with progress_bar(console, len(mc) + len(gen), "BIG-bench") as advance:
        scores = loglikelihoods(model, tokenizer, [(p, bigbench_choices(ex)) for _, ex, p in mc],
                                batch_size=batch_size, progress=advance)
        texts = greedy_generate(model, tokenizer, [p for _, _, p in gen], batch_size=batch_size,
                                progress=advance)
    for (name, ex, _), cand in zip(mc, scores):
        target_scores = list(ex["target_scores"].values())
        correct[name].append(target_scores[_argmax([s.logprob for s in cand])] == max(target_scores))
    for (name, ex, _), text in zip(gen, texts):
        correct[name].append(text.strip() in {t.strip() for t in bigbench_targets(ex)})
    n_mc = {name: sum(1 for t, _, _ in mc if t == name) for name in tasks}
    return {name: task_record(c, multiple_choice=n_mc[name], exact_match=len(c) - n_mc[name])
            for name, c in correct.items()}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first


# ------------------------------------------------------------------------------ results file


def results_dict(task: str, model: str | None, adapter: str | None, shots: int | None,
                 limit: int | None, wall_s: float, tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results-file object: header, overall and mean accuracy, then per task."""
    from rlora_cli import __version__

    scored = {k: v for k, v in tasks.items() if v.get("accuracy") is not None and v.get("n")}
    n = sum(v["n"] for v in scored.values())
    return {
        "task": task, "model": model, "adapter": adapter, "shots": shots, "limit": limit,
        "rlora_version": __version__, "wall_s": round(wall_s, 3),
        "accuracy": sum(v["accuracy"] * v["n"] for v in scored.values()) / n if n else None,
        "n": n,
        "mean_accuracy": sum(v["accuracy"] for v in scored.values()) / len(scored) if scored else None,
        "tasks": tasks,
    }


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def print_results(results: dict[str, Any], console: Any) -> None:
    """A rich table: one row per task, then the overall and the mean accuracy."""
    from rich.markup import escape
    from rich.table import Table

    extras = [k for k in ("f1", "loss", "perplexity") if any(k in v for v in results["tasks"].values())]
    table = Table(title=escape(f"{results['task']}: {results['model']}"
                               + (f" + {results['adapter']}" if results["adapter"] else "")))
    for col in ("task", "n", "accuracy", *extras):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, rec in results["tasks"].items():
        table.add_row(escape(name), _fmt(rec.get("n")), _fmt(rec.get("accuracy")),
                      *(_fmt(rec.get(k)) for k in extras))
    table.add_section()
    table.add_row("overall", _fmt(results["n"]), _fmt(results["accuracy"]), *("" for _ in extras))
    table.add_row("mean over tasks", "", _fmt(results["mean_accuracy"]), *("" for _ in extras))
    console.print(table)


# ------------------------------------------------------------------------ lm-evaluation-harness


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the hf backend is an extra)
    except ImportError as e:
        raise UserError(f"--backend lm-eval needs lm-evaluation-harness ({e})", LM_EVAL_HINT) from None
    return lm_eval


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], *, shots: int | None = None,
                limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """lm-eval's raw results for the loaded model (adapters injected, or merged)."""
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        raw = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit)
    except (KeyError, ValueError) as e:  # lm-eval's "Tasks not found: ..." and bad task options
        raise UserError(f"lm-eval: {e}", "check the task names with: lm-eval ls tasks") from None
    if raw is None:  # non-zero ranks of a distributed run
        raise UserError("lm-eval returned no results", "run it in a single process")
    return raw


def lm_eval_tasks(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's results as {task: {accuracy, n, <metric>: value}}; groups are left out (they are
    re-aggregated from their subtasks by `results_dict`)."""
    groups = set(raw.get("groups") or {}) | {g for g, subs in (raw.get("group_subtasks") or {}).items() if subs}
    n_samples = raw.get("n-samples") or {}
    out = {}
    for name, metrics in (raw.get("results") or {}).items():
        if name in groups:
            continue
        values = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values[metric if filt in ("", "none") else f"{metric},{filt}"] = value
        accuracy = next((values[k] for k in _accuracy_keys(values) if k in values), None)
        count = n_samples.get(name, {})
        n = count.get("effective", count.get("original")) if isinstance(count, dict) else None
        out[name] = {"accuracy": accuracy, "n": n, **values}
    if not out:
        raise UserError("lm-eval returned no task results", "check the task names: lm-eval ls tasks")
    return out


def _accuracy_keys(values: dict[str, Any]) -> list[str]:
    """Which metric is the accuracy: acc, else exact match (strict before flexible), else acc_norm."""
    exact = sorted((k for k in values if k.startswith("exact_match")), key=lambda k: ("strict" not in k, k))
    return ["acc", *exact, "acc_norm", "mc2", "mc1"]


# ----------------------------------------------------------------------------------- compare


def load_results(path: str | Path) -> dict[str, Any]:
    """A results file, checked for the shape `compare` needs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such results file", "give a file written by rlora eval --output")
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})", "give a file written by rlora eval --output") from None
    tasks = results.get("tasks") if isinstance(results, dict) else None
    bad = not isinstance(tasks, dict) or not all(isinstance(v, dict) and "accuracy" in v for v in tasks.values())
    if bad or "accuracy" not in results:
        raise UserError(f"{path}: not an rlora results file (needs `accuracy` and `tasks`: "
                        "{name: {accuracy, n, ...}})", "give a file written by rlora eval --output")
    return results


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _delta(a: Any, b: Any) -> dict[str, float | None]:
    a, b = _num(a), _num(b)
    return {"a": a, "b": b, "delta": b - a if a is not None and b is not None else None}


def compare(a_path: str | Path, b_path: str | Path, plot: str | Path | None = None,
            console: Any = None) -> dict[str, Any]:
    """Per-task deltas (B − A) of two results files; a rich table, and a PNG bar chart with `plot`."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from rlora_cli.checkpoint import check_output_file

    console = console or Console()
    if plot:
        check_output_file(plot, "--plot")
    a, b = load_results(a_path), load_results(b_path)
    tasks = {}
    for name in [*a["tasks"], *(t for t in b["tasks"] if t not in a["tasks"])]:
        ra, rb = a["tasks"].get(name, {}), b["tasks"].get(name, {})
        metric = next((m for m in ("accuracy", "f1", "loss", "perplexity")
                       if _num(ra.get(m)) is not None or _num(rb.get(m)) is not None), "accuracy")
        tasks[name] = {"metric": metric, **_delta(ra.get(metric), rb.get(metric))}
    out = {"a": str(a_path), "b": str(b_path), "tasks": tasks,
           "accuracy": _delta(a["accuracy"], b["accuracy"]),
           "mean_accuracy": _delta(a.get("mean_accuracy"), b.get("mean_accuracy"))}
    table = Table(title=escape(f"B − A   (A = {a_path}, B = {b_path})"))
    for col in ("task", "metric", "A", "B", "Δ"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, row in tasks.items():
        metric = row["metric"] + (" ↓" if row["metric"] in LOWER_IS_BETTER else "")  # lower is better
        table.add_row(escape(name), metric, _fmt(row["a"]), _fmt(row["b"]), _signed(row["delta"]))
    table.add_section()
    for name in ("accuracy", "mean_accuracy"):
        row = out[name]
        table.add_row("overall" if name == "accuracy" else "mean over tasks", "accuracy",
                      _fmt(row["a"]), _fmt(row["b"]), _signed(row["delta"]))
    console.print(table)
    if plot:
        plot_comparison(out, plot, _label(a, "A"), _label(b, "B"))
        console.print(f"plot written to {escape(str(plot))}")
    return out


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def _label(results: dict[str, Any], default: str) -> str:
    name = results.get("adapter") or results.get("model")
    return f"{default}: {name}" if name else default


def plot_comparison(comparison: dict[str, Any], path: str | Path, label_a: str, label_b: str) -> None:
    """Write `comparison_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = comparison_figure(comparison, label_a, label_b)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparison_figure(comparison: dict[str, Any], label_a: str, label_b: str) -> Any:
    """Grouped bars of A and B per task, Δ above each pair (green when B is better): one panel
    for accuracy-type metrics (with the overall accuracy), one for loss-type metrics, whose scale
    and direction differ — so every task of both files appears."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = comparison["tasks"].items()
    higher = [(k, v) for k, v in tasks if v["metric"] not in LOWER_IS_BETTER]
    higher.append(("overall", {"metric": "accuracy", **comparison["accuracy"]}))
    lower = [(k, v) for k, v in tasks if v["metric"] in LOWER_IS_BETTER]
    panels = [p for p in (higher, lower) if p]
    width = max(6.0, 0.7 * (len(higher) + len(lower)) + 2.5 * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [len(p) + 1 for p in panels]})
    for ax, rows in zip(axes[0], panels):
        _bars(ax, rows, label_a, label_b, lower_is_better=rows is lower)
    # One legend above the panels: inside a panel it would cover a bar or its Δ.
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return fig


LOWER_IS_BETTER = ("loss", "perplexity")


def _bars(ax: Any, rows: list[tuple[str, dict[str, Any]]], label_a: str, label_b: str, *,
          lower_is_better: bool) -> None:
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["a"] or 0 for _, r in rows], width=0.4, label=label_a)
    ax.bar([x + 0.2 for x in xs], [r["b"] or 0 for _, r in rows], width=0.4, label=label_b)
    for x, (_, r) in zip(xs, rows):
        if r["delta"] is not None:
            better = (r["delta"] < 0) == lower_is_better and r["delta"] != 0
            ax.annotate(f"{r['delta']:+.3f}", (x, max(r["a"] or 0, r["b"] or 0)), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points",
                        color="green" if better else "firebrick" if r["delta"] != 0 else "black")
    names = [name + {"f1": " (F1)", "perplexity": " (perplexity)"}.get(r["metric"], "") for name, r in rows]
    ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
    if lower_is_better:
        ax.set_ylabel("held-out loss (lower is better ↓)")
        ax.set_title("loss-scored tasks", fontsize=9)
        ax.set_ylim(0, 1.2 * max([r[k] or 0 for _, r in rows for k in ("a", "b")] + [1e-9]))
    else:
        ax.set_ylabel("accuracy or F1 (higher is better ↑)")
        ax.set_title("accuracy-scored tasks", fontsize=9)
        ax.set_ylim(0, 1.1)
