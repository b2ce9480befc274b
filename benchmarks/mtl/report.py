"""The benchmark's results: mean ± sample std over seeds per task and on average, the markdown
table, and the plots (accuracy per method; head similarity rlora vs hydralora and ΔW spectra
multilora vs lora, drawn by `rlora_cli.report.analyze`). A router variant scored with `--fold`
gets a second row, "<variant> (folded)": the router fixed to each task's fold.

    python -m benchmarks.mtl.report OUT_OR_RAW [--out DIR]

rebuilds results.json, results.md and plots/ from a benchmark folder's result files alone (no
model, no GPU): an OUT of `python -m benchmarks.mtl`, or its committed copy under
benchmarks/raw/ (whose per-run folders are `by_run/`, since git ignores `runs/`). Budget files
(`--budgets`) give the learning curves (curves.py, report_curves.py); else the single-budget
runs' result.json files give the table above. `--out` writes elsewhere (default: into the folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from rlora_cli.errors import UserError
from rlora_cli.files import atomic_write_text
from rlora_cli.report.common import pyplot, save_png

from . import curves, report_curves
from .plan import VARIANTS, Settings
from .stats import spread


def summarize(settings: Settings, tasks: dict[str, Any], base: dict[int, dict[str, Any]],
              runs: list[dict[str, Any]], counts: dict[str, int], matched_r: int) -> dict[str, Any]:
    """results.json: settings, the base model and each method, per task and on average (the rows
    of the learning curves, curves.row), with each run's time."""
    names = list(tasks)
    methods: dict[str, Any] = {}
    for m in settings.methods:
        mine = [r for r in runs if r["method"] == m]
        methods[m] = {**curves.row(mine, names, curves.description(m, {"lora_matched_r": matched_r}),
                                   counts.get(m)),
                      "wall_s": spread([r["wall_s"] for r in mine]),
                      "train_s": spread([r["train_s"] for r in mine])}
        folded = [{**r, **r["folded"]} for r in mine if "folded" in r]
        if folded:
            methods[m + curves.FOLDED] = {**curves.row(folded, names, curves.FOLDED_ROW),
                                          "wall_s": spread([]), "train_s": spread([])}
    base_runs = list(base.values())
    return {
        "settings": settings.to_dict(), "lora_matched_r": matched_r,
        "tasks": {t: {"held_out": base_runs[0]["tasks"][t]["n"] if base_runs else None} for t in names},
        "base": {"tasks": {t: spread([b["tasks"][t]["accuracy"] for b in base_runs]) for t in names},
                 "average": spread([b["mean_accuracy"] for b in base_runs])},
        "methods": methods, "runs": runs,
    }


def markdown(results: dict[str, Any]) -> str:
    """One table: accuracy (%) per task and on average, mean ± std over seeds, then cost."""
    tasks = list(results["tasks"])
    st = results["settings"]
    held_out = ", ".join(f"{t} {v['held_out']}" for t, v in results["tasks"].items())

    def seconds(r: dict[str, Any]) -> str:
        return "-" if r["wall_s"]["mean"] is None else str(round(r["wall_s"]["mean"]))

    lines = [f"Held-out accuracy (%), mean ± std over seeds {', '.join(map(str, st['seeds']))}; "
             f"model {st['model']}; r = {st['r']}, heads = {st['num_heads']}, "
             f"targets {st['target_modules']}; held-out per task: {held_out}.", "",
             *report_curves.accuracy_table(tasks, results["base"], results["methods"], "s / run", seconds)]
    methods = "; ".join(f"`{m}` = {r['description']}" for m, r in results["methods"].items())
    lines += ["", f"Methods: {methods}."]
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], analyses: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    """accuracy.png always; head_similarity.png (rlora vs hydralora) and spectra.png (multilora vs
    lora) when those methods ran."""
    from rlora_cli.report.analyze import plot_head_similarity, plot_spectra

    folder.mkdir(parents=True, exist_ok=True)
    written = [plot_accuracy(results, folder / "accuracy.png")]
    heads = {m: analyses[m] for m in ("rlora", "hydralora") if m in analyses}
    if heads:
        written.append(plot_head_similarity(heads, folder / "head_similarity.png"))
    spectra = {m: analyses[m] for m in ("multilora", "lora") if m in analyses}
    if spectra:
        written.append(plot_spectra(spectra, folder / "spectra.png"))
    return [p for p in written if p is not None]


def plot_accuracy(results: dict[str, Any], path: Path) -> Path:
    """Grouped bars: accuracy per task and on average, one bar per method (base first), ±std. A
    folded variant shares its routed twin's colour, hatched, so 14 series stay readable."""
    plt = pyplot()
    groups = [*results["tasks"], "average"]
    series = {"base": results["base"], **results["methods"]}
    twins = list(dict.fromkeys(name.removesuffix(curves.FOLDED) for name in series if name != "base"))
    palette = plt.get_cmap("tab10" if len(twins) <= 10 else "tab20")
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(min(18.0, max(7.0, 0.3 * len(groups) * len(series))), 4.5))
    for i, (name, r) in enumerate(series.items()):
        stats = [r["average"] if g == "average" else r["tasks"][g] for g in groups]
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        twin = name.removesuffix(curves.FOLDED)
        colour = "grey" if name == "base" else palette(twins.index(twin))
        ax.bar(xs, [s["mean"] or 0 for s in stats], width, yerr=[s["std"] or 0 for s in stats],
               capsize=1.5, label=name, color=colour, hatch="//" if twin != name else None,
               edgecolor="white" if twin != name else None, linewidth=0)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="held-out accuracy", ylim=(0, 1.05), title="Accuracy per task (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2 if len(series) <= 8 else 3)
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


# ------------------------------------------------------------------- rebuilding from the files


def rebuild(folder: str | Path, dest: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """results.json, results.md and plots/ of a benchmark folder, from its result files alone,
    written to `dest` (default: the folder); returns (results, markdown)."""
    folder = Path(folder)
    dest = Path(dest) if dest is not None else folder
    analyses = {p.stem: json.loads(p.read_text()) for p in sorted((folder / "analysis").glob("*.json"))}
    if curves.budget_files(folder):
        results = curves.build(folder)
        text = report_curves.markdown(results)
        report_curves.plot_curves(results, dest / "plots" / "curves.png")
        report_curves.plot_router_entropy(results, dest / "plots" / "router_entropy.png")
        last = results["by_budget"][str(results["budgets"][-1])]  # the existing plots: at the largest budget
        plots({"tasks": results["tasks"], "base": last["base"], "methods": last["methods"]}, analyses,
              dest / "plots")
    else:
        results = single_budget(folder)
        text = markdown(results)
        plots(results, analyses, dest / "plots")
    atomic_write_text(dest / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(dest / "results.md", text)
    return results, text


def single_budget(folder: Path) -> dict[str, Any]:
    """The single-budget results (round 1) from settings.json, base/ and each run's result.json."""
    path = folder / "settings.json"
    saved = json.loads(path.read_text()) if path.is_file() else None
    files = sorted(p for name in curves.RESULT_FOLDERS for p in (folder / name).glob("*/result.json"))
    if saved is None or not files:
        raise UserError(f"{folder}: no result files (runs/ or by_run/ with budget-<N>.json or result.json, "
                        "and settings.json)", "give an OUT folder of python -m benchmarks.mtl, or its copy "
                        "under benchmarks/raw/")
    fields = set(Settings.__dataclass_fields__) - {"tasks"}  # settings.json's "tasks" says more: a dict
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in saved.items() if k in fields})
    runs = [json.loads(p.read_text()) for p in files]
    found = {r["method"] for r in runs}
    methods = tuple(dict.fromkeys([*(m for m in settings.methods if m in found),
                                   *(m for m in VARIANTS if m in found)]))
    base = {int(p.stem.removeprefix("seed")): json.loads(p.read_text())
            for p in sorted((folder / "base").glob("seed*.json"))}
    order = {(m, s): i for i, (s, m) in enumerate((s, m) for s in settings.seeds for m in methods)}
    runs.sort(key=lambda r: order.get((r["method"], r["seed"]), len(order)))
    return summarize(dataclasses.replace(settings, methods=methods), saved["tasks"], base, runs,
                     saved.get("planned_trainable", {}), saved["lora_matched_r"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mtl.report", description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a benchmark OUT folder, or its copy under benchmarks/raw/")
    ap.add_argument("--out", default=None,
                    help="where results.json, results.md and plots/ go (default: FOLDER)")
    args = ap.parse_args(argv)
    try:
        _, text = rebuild(args.folder, args.out)
    except UserError as e:
        print(f"error: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(text, end="")


if __name__ == "__main__":
    main()
