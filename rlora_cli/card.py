"""The model card: the README.md, in Hugging Face's model-card format, of every folder that leaves a run.

    model_card(Path("runs/mixed/adapter"))                  # RUN/adapter, RUN/checkpoint-N/adapter
    model_card(adapter, library="peft")                     # a PEFT export of that adapter
    model_card(adapter, merged=True, fold=fold)             # a merged model (folded for one task)
    save_adapter(model, out / "adapter", card=training_card(out, state))   # what training writes

A card is YAML front matter (base_model, library_name, tags, and datasets: the recipe's sources
that are hub ids), then Markdown: the method and its settings, the target modules and trainable
parameters (counted from the safetensors header), the recipe's sources with their weights and
example counts (RUN/mixture.json, RUN/recipe.yaml), steps, tokens and the last losses per task
(RUN/metrics.jsonl), the results files of `rlora eval` kept in the run folder, the task a routed
adapter was folded for, and how to use the folder. What the folder around the adapter does not
hold is left out: a card never fails for a missing or damaged run file. User text goes through
`yaml.safe_dump` in the front matter and through `_cell`/`_code` in the Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from rlora_cli.checkpoint import is_repo_id
from rlora_cli.config.data import looks_local
from rlora_cli.runs import STATE_FILE, adapter_info, checkpoint_step, read_metrics, run_folder

METHOD_NAMES = {"lora": "LoRA", "multilora": "MultiLoRA", "hydralora": "HydraLoRA", "rlora": "R-LoRA"}
RESULT_METRICS = ("accuracy", "f1", "loss", "perplexity")  # eval/results.py's metrics, in its order
MAX_RESULTS_BYTES = 5_000_000  # a results file is small; larger JSON in the run folder is not one
HERE = "path/to/this/folder"  # where the card's usage snippets load the folder from


def model_card(adapter_dir: Path, *, library: str = "rlora", fold: dict | None = None,
               merged: bool = False) -> str:
    """The README.md text for a folder made from the adapter in `adapter_dir` (library: rlora for
    the adapter itself, peft for a PEFT export; merged: a plain transformers model). Its run
    folder, when it has one, supplies the data, training and evaluation sections."""
    adapter_dir = Path(adapter_dir)
    return card_text(adapter_dir, run_folder(adapter_dir), library=library, fold=fold, merged=merged)


def training_card(run: Path, state: Any) -> Callable[[Path], str]:
    """The card writer `save_adapter` calls on its temporary folder while training: the run
    folder as it is now, and the trainer's own counters (a TrainerState, or a dict of its step,
    tokens and total_steps), read now: the card describes the adapter being saved."""
    trained = dataclasses.asdict(state) if dataclasses.is_dataclass(state) else dict(state)
    return lambda folder: card_text(folder, run, trained=trained)


def card_text(adapter_dir: Path, run: Path | None, *, trained: dict[str, Any] | None = None,
              library: str = "rlora", fold: dict | None = None, merged: bool = False) -> str:
    """The card of `adapter_dir` with the run folder `run` (None: the adapter alone)."""
    info = adapter_info(adapter_dir)
    library = "transformers" if merged else library
    recipe = _read(run / "recipe.yaml", yaml.safe_load) if run else None
    mixture = _read(run / "mixture.json") if run else None
    trained = trained or (_trained(adapter_dir, run) if run else None)
    rows = _metrics(run, trained.get("step") if trained else None) if run else []
    sources = _sources(recipe, mixture)
    front = _front_matter(info, sources, library)
    parts = [_title(info, library), _adapter_section(info, library), _data_section(sources, mixture),
             _training_section(trained, rows, recipe), _eval_section(run, adapter_dir) if run else None,
             _fold_section(fold), _usage_section(info, library)]
    body = "\n\n".join(p for p in parts if p)
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body + "\n"


# ---------------------------------------------------------------- what the run folder holds


def _read(path: Path, loads: Callable[[str], Any] = json.loads) -> Any:
    """A run file's content, or None when it is missing or damaged (a card never fails for it)."""
    try:
        return loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _metrics(run: Path, step: Any) -> list[dict[str, Any]]:
    """metrics.jsonl's rows up to `step` (those of the adapter's own moment); none when unreadable."""
    try:
        rows = read_metrics(run / "metrics.jsonl")
    except (OSError, ValueError):
        return []
    last = step if isinstance(step, int) else float("inf")
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= last]


def _trained(adapter_dir: Path, run: Path) -> dict[str, Any] | None:
    """The trainer's counters behind an adapter: its checkpoint's trainer_state.json, or, for
    RUN/adapter (written right after the last checkpoint), the newest checkpoint's."""
    if checkpoint_step(adapter_dir.parent) is not None:
        state = _read(adapter_dir.parent / STATE_FILE)
    else:
        found = [c for c in run.glob("checkpoint-*") if checkpoint_step(c) is not None]
        newest = max(found, key=checkpoint_step, default=None)
        state = _read(newest / STATE_FILE) if newest else None
    return state if isinstance(state, dict) else None


def _sources(recipe: Any, mixture: Any) -> list[dict[str, Any]]:
    """The recipe's sources, each with its mixture line (examples, held out, tokens) when there is one."""
    data = recipe.get("data") if isinstance(recipe, dict) else None
    listed = data.get("datasets") if isinstance(data, dict) else None
    mixed = mixture.get("sources") if isinstance(mixture, dict) else None
    mixed = [m for m in mixed or [] if isinstance(m, dict)]
    if not isinstance(listed, list):
        return mixed
    by_name = {m.get("name"): m for m in mixed}
    out = []
    for i, d in enumerate(x for x in listed if isinstance(x, dict)):
        line = by_name.get(d.get("name")) or (mixed[i] if i < len(mixed) else {})
        out.append({**line, **{k: v for k, v in d.items() if v not in (None, "", {})}})
    return out


def _hub_dataset(source: dict[str, Any]) -> str | None:
    """The source's hub id, or None for a local file or a BIG-bench task (read as the data loader
    reads it: `looks_local` or an existing path is local, else a valid repo id is a hub id)."""
    path = source.get("path")
    if not isinstance(path, str) or source.get("format") or not path or looks_local(path):
        return None
    return path if is_repo_id(path) and not Path(path).expanduser().exists() else None


def _eval_results(run: Path, adapter_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """The `rlora eval --output` files kept in the run folder (or one folder down) that scored
    this adapter, or the base model alone (a baseline); (name relative to the run, results)."""
    found = []
    for path in sorted(p for p in [*run.glob("*.json"), *run.glob("*/*.json")] if p.is_file()):
        skip = path.parent.name in ("adapter", "plots") or checkpoint_step(path.parent) is not None
        if skip or path.name.startswith(".") or path.stat().st_size > MAX_RESULTS_BYTES:
            continue
        results = _read(path)
        tasks = results.get("tasks") if isinstance(results, dict) else None
        if isinstance(tasks, dict) and "accuracy" in results and _scored(results.get("adapter"), adapter_dir):
            found.append((str(path.relative_to(run)), results))
    return found


def _scored(adapter: Any, adapter_dir: Path) -> bool:
    """Whether a results file's `adapter` (as eval was given it, maybe relative to another
    working folder) names this adapter folder; no adapter means the base model alone."""
    if adapter is None:
        return True
    if not isinstance(adapter, str):
        return False
    given, here = Path(adapter), adapter_dir.resolve()
    if given.exists():
        return given.resolve() == here
    return not given.is_absolute() and here.parts[-len(given.parts):] == given.parts


# ---------------------------------------------------------------- the front matter and sections


def _front_matter(info: dict[str, Any], sources: list[dict[str, Any]], library: str) -> dict[str, Any]:
    front: dict[str, Any] = {}
    base = info["base_model_hub_id"] or info["base_model"]
    if base:
        front["base_model"] = base
    front["library_name"] = library
    front["tags"] = list(dict.fromkeys([info["method"], "rlora", "lora"]))
    datasets = [d for d in dict.fromkeys(map(_hub_dataset, sources)) if d]
    if datasets:
        front["datasets"] = datasets
    front["pipeline_tag"] = "text-generation"
    return front


def _title(info: dict[str, Any], library: str) -> str:
    name = METHOD_NAMES.get(info["method"], info["method"])
    base = info["base_model_hub_id"] or info["base_model"]
    on = f" on {_code(base)}" if base else ""
    if library == "transformers":
        return (f"# {name} merged model\n\n{_code(base) if base else 'A base model'} with an rlora {name} "
                "adapter merged into its weights: a plain transformers model.")
    if library == "peft":
        return f"# {name} adapter as a PEFT LoRA\n\nAn rlora {name} adapter{on}, exported as a PEFT LoRA."
    version = f" {info['rlora_version']}" if info["rlora_version"] else ""
    return f"# {name} adapter\n\nAn rlora {name} adapter{on}, trained with rlora{version}."


def _adapter_section(info: dict[str, Any], library: str) -> str:
    o = info["options"]
    frozen = (f" (+ {info['frozen_params']:,} frozen initial factors A0, B0, kept for the compensation)"
              if info["frozen_params"] else "")
    merge = (f"yes: exactly, as a PEFT LoRA of rank {info['peft_rank']}" if info["mergeable"]
             else f"per task only: {info['not_mergeable_because']}")
    rows = [("method", f"{METHOD_NAMES.get(info['method'], info['method'])} ({_code(info['method'])})"),
            ("rank r", o.get("r")),
            ("heads", o.get("num_heads")),
            ("alpha / scaling", f"{_num(o.get('lora_alpha'), 'g')} / {info['scaling']:g}"
                                + (" (rsLoRA)" if o.get("use_rslora") else "")),
            *_mixing_rows(info["method"], o),
            ("dropout", f"{o.get('lora_dropout')}" + (" (a mask per head)" if o.get("head_dropout") else "")),
            ("target modules", f"{_code(_targets(info['targets']))} → {info['num_modules']} modules: "
                               + ", ".join(map(_code, info["module_names"]))),
            ("trainable parameters", f"{info['trainable_params']:,}{frozen}"),
            ("base model", f"{_code(info['base_model'])} ({info['base_dtype']})" if info["base_model"]
                           else None),
            ("mergeable", merge if library == "rlora" else None)]  # an export's own folder is static
    return "## Adapter\n\n" + _table(("setting", "value"), [r for r in rows if r[1] is not None])


def _mixing_rows(method: str, o: dict[str, Any]) -> list[tuple[str, Any]]:
    """How the heads combine: the router (hydralora, rlora), the gates (multilora)."""
    if method == "multilora":
        ratio = o.get("gate_lr_ratio", 1.0)
        return [("gates", "a learned scalar per parallel module"
                 + (f", learning rate × {ratio:g}" if ratio != 1.0 else ""))]
    if o.get("router") is None:
        return []
    router = ("softmax, per token" if o["router"] == "softmax" else "off (uniform 1/n: exactly mergeable)")
    ratio = o.get("router_lr_ratio", 1.0)
    if o["router"] == "softmax" and ratio != 1.0:
        router += f", learning rate × {ratio:g}"
    if o["router"] == "softmax" and o.get("router_aux_weight"):
        router += f", task-balancing (mutual-information) loss × {o['router_aux_weight']:g}"
    init = f"{o.get('init')}" + (", random heads (compensated)" if o.get("random_init") else "")
    return [("router", router), ("init", init)]


def _targets(targets: Any) -> str:
    return ", ".join(targets) if isinstance(targets, list) else str(targets)


def _data_section(sources: list[dict[str, Any]], mixture: Any) -> str | None:
    if not sources:
        return None
    rows = [(_code(s.get("name")), _code(_where(s)), s.get("kind") or s.get("format"),
             _num(s.get("weight"), "g"), _int(s.get("used")), _int(s.get("val_rows")),
             _int(s.get("trained_tokens"))) for s in sources]
    head = ("source", "from", "kind", "weight", "examples / epoch", "held out", "trained tokens / epoch")
    text = "## Training data\n\n" + _table(head, rows)
    if isinstance(mixture, dict):
        text += (f"\n\nMixture: {_int(mixture.get('examples'))} examples per epoch, temperature "
                 f"{_num(mixture.get('temperature'), 'g')}, max length {mixture.get('max_length')} tokens, "
                 f"packing {'on' if mixture.get('packing') else 'off'}.")
    return text


def _where(source: dict[str, Any]) -> str:
    extra = [f"{k} {source[k]}" for k in ("subset", "split") if source.get(k)]
    return str(source.get("path", "")) + (f" ({', '.join(extra)})" if extra else "")


def _training_section(trained: dict[str, Any] | None, rows: list[dict[str, Any]], recipe: Any) -> str | None:
    """Steps and tokens (the trainer's counters, else the last log line), the recipe's main
    settings, and the last logged loss per task beside the last held-out loss."""
    logged = [r for r in rows if isinstance(r.get("task_loss"), dict)]
    held = [r for r in rows if isinstance(r.get("eval_loss"), dict)]
    if not (trained or logged or held):
        return None
    last = logged[-1] if logged else {}
    step = (trained or {}).get("step", last.get("step"))
    total = (trained or {}).get("total_steps")
    tokens = (trained or {}).get("tokens", last.get("tokens"))
    counts = [f"Steps: {_int(step)}" + (f" of {_int(total)}" if _int(total) and total != step else "")
              if _int(step) else None, f"trained (label) tokens: {_int(tokens)}" if _int(tokens) else None]
    said = "; ".join(c for c in counts if c)
    text = "## Training\n\n" + " ".join(t for t in (f"{said}." if said else "", _hyper(recipe)) if t)
    table = _loss_table(last, held[-1] if held else None)
    return text.rstrip() + ("\n\n" + table if table else "")


def _loss_table(last: dict[str, Any], held: dict[str, Any] | None) -> str | None:
    """task | train loss (the last log line's window) | held-out loss; a column only when logged."""
    train, evals = last.get("task_loss", {}), (held or {}).get("eval_loss", {})
    columns = ([(f"train loss (step {last.get('step')})", train)] if last else []) + \
              ([(f"held-out loss (step {held.get('step')})", evals)] if held else [])
    rows = [(_code(t), *(_num(values.get(t)) for _, values in columns))
            for t in dict.fromkeys([*train, *evals])]
    if "loss" in last:
        rows.append(("all", _num(last["loss"]), *([None] if held else [])))
    return _table(("task", *(name for name, _ in columns)), rows) if rows else None


def _hyper(recipe: Any) -> str:
    t = recipe.get("train") if isinstance(recipe, dict) else None
    if not isinstance(t, dict):
        return ""
    batch = [t.get(k) for k in ("micro_batch_size", "gradient_accumulation_steps")]
    return (f"Learning rate {t.get('learning_rate')} ({t.get('lr_scheduler', 'schedule')}), batch "
            f"{batch[0]} × {batch[1]} accumulation per process, precision {t.get('precision')}.")


def _eval_section(run: Path, adapter_dir: Path) -> str | None:
    rows = []
    for name, results in _eval_results(run, adapter_dir):
        who = "this adapter" if results.get("adapter") else "base model alone"
        for task, r in results["tasks"].items():
            if isinstance(r, dict):
                rows.append((_code(name), _code(results.get("task")), who, _code(task), *_metric(r),
                             _int(r.get("n"))))
        if results.get("accuracy") is not None:
            rows.append((_code(name), _code(results.get("task")), who, "all", "accuracy",
                         _num(results["accuracy"]), _int(results.get("n"))))
    head = ("results file", "suite", "model", "task", "metric", "value", "n")
    return "## Evaluation\n\n" + _table(head, rows) if rows else None


def _metric(r: dict[str, Any]) -> tuple[str, str | None]:
    name = next((m for m in RESULT_METRICS if _num(r.get(m)) is not None), "accuracy")
    return name, _num(r.get(name))


def _fold_section(fold: dict | None) -> str | None:
    if not fold:
        return None
    mixture = list(fold.get("mixture") or [])
    text = (f"## Folded for task {_code(fold.get('task'))}\n\nThe router is replaced by a fixed head "
            f"mixture: its mean routing weights over {_int(fold.get('examples'))} examples "
            f"({_int(fold.get('tokens'))} tokens) of the task, from {_code(fold.get('source'))}; "
            f"the mixture's entropy is {_num(fold.get('entropy'))}.")
    rows = [(f"head {i}", _num(w)) for i, w in enumerate(mixture)]
    return text + ("\n\n" + _table(("head", "weight"), rows) if rows else "")


def _usage_section(info: dict[str, Any], library: str) -> str:
    base = info["base_model_hub_id"] or info["base_model"] or "BASE_MODEL"
    if library == "transformers":
        code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({HERE!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({HERE!r})")
        return "## How to use\n\n" + _block("python", code)
    if library == "peft":
        code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
                f"model = PeftModel.from_pretrained(base, {HERE!r})")
        return "## How to use\n\n" + _block("python", code)
    code = (f'rlora generate --adapter {HERE} "Your prompt"\n'
            f"rlora eval --task mmlu --adapter {HERE} --limit 50")
    return ("## How to use\n\n" + _block("bash", code) + "\n\nThe base model is the one `rlora_config.json` "
            "records; pass `--model` to use another copy of it.")


# ---------------------------------------------------------------- Markdown that user text cannot break


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """A table cell: `|` escaped (also inside code spans, as GFM tables need), one line."""
    return "-" if value is None or value == "" else " ".join(str(value).splitlines()).replace("|", "\\|")


def _code(text: Any) -> str:
    """An inline code span that holds any text: its fence is longer than any backtick run inside."""
    if text is None:
        return "-"
    text = " ".join(str(text).splitlines())
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _block(lang: str, code: str) -> str:
    fence = "`" * max(3, max(map(len, re.findall("`+", code)), default=0) + 1)
    return f"{fence}{lang}\n{code}\n{fence}"


def _num(x: Any, spec: str = ".4f") -> str | None:
    """A number as the card prints it (integers whole); None for anything else."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    return str(int(x)) if isinstance(x, numbers.Integral) else format(float(x), spec)


def _int(x: Any) -> str | None:
    return f"{int(x):,}" if isinstance(x, numbers.Integral) and not isinstance(x, bool) else None
