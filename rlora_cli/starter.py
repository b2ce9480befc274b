"""`rlora init OUT.yaml`: a commented starter recipe, and a tiny example source of each data kind.

    write_starter("my_recipe.yaml", method="rlora", model="HuggingFaceTB/SmolLM2-135M-Instruct")
    # then: rlora train my_recipe.yaml

Beside OUT.yaml goes OUT_data/, one small JSONL per data kind (a handful of rows, written here),
so the recipe trains as written, from any folder (its data paths are absolute). The adapter
section is the method's preset (configs/adapters/<method>.yaml) spelled out. Each key's comment
says what it does and what LLaMA-Factory, axolotl, PEFT or the transformers Trainer call it: the
names come from recipe/typed.py's ALIASES, the list `rlora train` uses for its unknown-key hints.
Nothing is replaced unless `overwrite`; the data folder is written first and removed again when
the recipe cannot be written, so a failed start blocks no rerun.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from rlora_cli.adapters.methods import METHODS
from rlora_cli.config import KINDS
from rlora_cli.errors import UserError
from rlora_cli.files import atomic_dir, atomic_write_text, check_output_file
from rlora_cli.recipe.load import adapter_preset
from rlora_cli.recipe.typed import ALIASES, DATASET_ALIASES

# The demo's model: small enough to train on a CPU (`make demo` keeps it in .models/).
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What each adapter key does, in a few words (rlora_cli/adapters/methods.py says it in full).
ADAPTER_NOTES = {
    "type": "lora | multilora | hydralora | rlora",
    "r": "rank of each low-rank factor (per head)",
    "num_heads": "B heads (hydralora, rlora) or parallel LoRAs (multilora); lora has 1",
    "lora_alpha": "scale = lora_alpha / r (/ sqrt(r) with use_rslora)",
    "lora_dropout": "dropout on the adapter's input",
    "use_rslora": "rank-stabilised scaling",
    "target_modules": "module names, one regex, or all-linear",
    "router": "softmax (a token-wise router) | off (uniform 1/n heads: exactly mergeable)",
    "init": "paper | reference (the released code's scaling)",
    "random_init": "heads start random, compensated so training starts at the base model",
    "head_dropout": "an independent dropout mask per head",
}
PEFT_NAMES = ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules")
COMMENT_AT = 40  # the column comments start at, so they read as one column


def write_starter(output: str | Path, *, method: str = "rlora", model: str | None = None,
                  overwrite: bool = False) -> Path:
    """Write the starter recipe OUT.yaml and its example data OUT_data/; returns OUT.yaml's path.
    UserError for an unknown method or (without `overwrite`) an OUT.yaml or OUT_data that exists."""
    output = Path(output)
    data_dir = output.with_name(f"{output.stem}_data")
    _check(output, data_dir, method, overwrite)
    sources = _write_data(data_dir)
    try:
        atomic_write_text(output, starter_text(output, method, model or DEFAULT_MODEL, sources))
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return output


def _check(output: Path, data_dir: Path, method: str, overwrite: bool) -> None:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}", f"choose one of {', '.join(METHODS)}")
    if output.suffix not in (".yaml", ".yml"):
        raise UserError(f"{output}: a recipe file name ends in .yaml", f"e.g. rlora init {output.stem}.yaml")
    check_output_file(output, "OUT.yaml")
    for path in (output, data_dir):
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists", "pass --overwrite to replace it, or choose another name")


# ------------------------------------------------------------------ the recipe text


def starter_text(output: Path, method: str, model: str, sources: list[dict[str, Any]]) -> str:
    """The commented recipe: every section, the method's preset, one source per data kind."""
    name = output.name
    head = [f"# rlora train {name}          (written by `rlora init`; edit it, then run this)",
            f"# Preview without loading weights:   rlora train {name} --dry-run",
            f"# Every key, defaults filled in:     rlora train {name} --print-config",
            "# rlora_cli/config/ documents each key. `elsewhere:` names what LLaMA-Factory, axolotl,",
            "# PEFT or the transformers Trainer call it.",
            "", "seed: 0", ""]
    return "\n".join(head + _model(model) + _adapter(method) + _data(sources) + _train()
                     + _output(output.stem)) + "\n"


def _model(model: str) -> list[str]:
    return ["model:",
            *_kv("name_or_path", model, "a hub id or a local folder", "model.name_or_path"),
            *_kv("dtype", "auto", "auto | fp32 | bf16 | fp16 (the frozen base's)", "model.dtype"), ""]


def _adapter(method: str) -> list[str]:
    lines = [_commented("adapter:", f"configs/adapters/{method}.yaml, spelled out")]
    for key, value in adapter_preset(method).items():
        lines += _kv(key, value, ADAPTER_NOTES.get(key, ""), f"adapter.{key}", peft=key in PEFT_NAMES)
    return lines + [""]


def _data(sources: list[dict[str, Any]]) -> list[str]:
    lines = ["data:",
             *_kv("max_length", 256, "tokens per example (a longer prompt loses its start)",
                  "data.max_length"),
             *_kv("packing", False, "several examples per row", "data.packing"),
             *_kv("train_on_prompt", False, "loss on the prompt too (default: the response only)",
                  "data.train_on_prompt"),
             *_kv("temperature", 1.0, "task shares follow weight^(1/temperature)", "data.temperature"),
             *_kv("datasets", None, "one task per source; a hub dataset id works as path too",
                  "data.datasets")]
    for source in sources:
        lines += _source(source)
    return lines + [""]


def _source(source: dict[str, Any]) -> list[str]:
    lines = [f"    # {source['about']}"]
    notes = {"path": "absolute, so the recipe trains from any folder",
             "kind": " | ".join(KINDS),
             "label_words": "the word for each label: what the model learns to answer",
             "weight": "its share of the mixture, before temperature",
             "val_size": "held-out rows: a count, or a fraction"}
    for i, key in enumerate(k for k in source if k != "about"):
        entry = _kv(key, source[key], notes.get(key, ""), f"data.datasets[].{key}", indent=6,
                    dataset_key=key)
        lines += ["    - " + entry[0].lstrip(), *entry[1:]] if i == 0 else entry
    return lines


def _train() -> list[str]:
    rows = [("num_epochs", 3, "passes over the mixture"),
            ("max_steps", -1, "-1 = num_epochs; else this many optimizer steps"),
            ("micro_batch_size", 4, "rows per device per forward"),
            ("gradient_accumulation_steps", 1, "micro-batches per optimizer step"),
            ("learning_rate", 1.0e-3, "AdamW's peak"),
            ("lr_scheduler", "cosine", "linear | cosine | constant"),
            ("warmup_ratio", 0.05, "a fraction of the steps"),
            ("precision", "auto", "auto | bf16 | fp16 | fp32 (auto: bf16 on a GPU that has it)"),
            ("gradient_checkpointing", False, "less memory, slower")]
    return ["train:", *(line for k, v, note in rows for line in _kv(k, v, note, f"train.{k}")), ""]


def _output(stem: str) -> list[str]:
    rows = [("dir", f"runs/{stem}", "the run folder (--output overrides it)"),
            ("save_steps", 100, "a checkpoint every this many steps (and at the end)"),
            ("save_total_limit", 2, "checkpoints kept"),
            ("logging_steps", 5, "a metrics.jsonl line every this many steps"),
            ("eval_steps", 0, "held-out loss every this many steps (0 = at the end)"),
            ("log_with", "none", "none | tensorboard | wandb | ...")]
    return ["output:", *(line for k, v, note in rows for line in _kv(k, v, note, f"output.{k}"))]


def _kv(key: str, value: Any, note: str, dotted: str, *, indent: int = 2, peft: bool = False,
        dataset_key: str | None = None) -> list[str]:
    """`key: value  # note`, and under it a comment with the other tools' names for the key."""
    text = " " * indent + f"{key}:" + ("" if value is None else f" {_flow(value)}")
    names = ([f"{key} (PEFT)"] if peft else []) + other_names(dotted, ALIASES)
    if dataset_key:
        names += other_names(dataset_key, DATASET_ALIASES)
    return [_commented(text, note)] + ([_commented("", "elsewhere: " + ", ".join(names))] if names else [])


def _commented(text: str, comment: str) -> str:
    # YAML needs a space before '#', else the comment would be read as part of the value.
    return f"{text}{' ' * max(COMMENT_AT - len(text), 2)}# {comment}" if comment else text


def other_names(dotted: str, aliases: dict[str, tuple[str, str | None]]) -> list[str]:
    """['lora_r (axolotl)', 'lora_rank (LLaMA-Factory)']: the tools' names that point at a key."""
    return [f"{alias} ({tool})" for alias, (target, tool) in aliases.items()
            if tool and re.split(r"[ :]", target)[0] == dotted]


def _flow(value: Any) -> str:
    """A value as one line of YAML: [a, b] for a list."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("...\n").strip()


# ------------------------------------------------------------------ the example data


def _write_data(data_dir: Path) -> list[dict[str, Any]]:
    """One JSONL per data kind rlora knows; returns the recipe's source entries for them."""
    examples = example_sources()
    with atomic_dir(data_dir) as tmp:
        for kind in KINDS:
            if kind in examples:
                rows = examples[kind]["rows"]
                (tmp / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [{"about": examples[kind]["about"], "name": examples[kind]["name"],
             "path": str((data_dir / f"{kind}.jsonl").absolute()), "kind": kind, **examples[kind]["keys"],
             "weight": 1.0, "val_size": 2} for kind in KINDS if kind in examples]


def example_sources() -> dict[str, dict[str, Any]]:
    """kind -> a task of that kind: its name, a comment on its rows, its rows, its extra keys."""
    words = ["cat", "lamp", "river", "stone", "apple", "cloud", "green", "piano"]
    capitals = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"),
                ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo")]
    cities = [c for _, c in capitals]
    opposites = [("hot", "cold"), ("up", "down"), ("early", "late"), ("light", "dark"), ("full", "empty"),
                 ("fast", "slow"), ("open", "closed"), ("wet", "dry")]
    moods = ["great", "lovely", "wonderful", "excellent", "awful", "boring", "terrible", "dull"]
    return {
        "instruction": _task("reverse", "instruction, input (optional), output", [
            {"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]} for w in words]),
        "nlu": _task("sentiment", "text, label (an index into label_words, or the word)", [
            {"text": f"The film was {m}.", "label": int(i < 4)} for i, m in enumerate(moods)],
            label_words=["negative", "positive"]),
        "knowledge": _task("capitals", "question, choices (optional), answer (a choice's index or text)", [
            {"question": f"What is the capital of {country}?",
             "choices": [cities[(i + k) % 8] for k in range(4)][::-1 if i % 2 else 1],
             "answer": 0 if i % 2 == 0 else 3} for i, (country, _) in enumerate(capitals)]),
        "chat": _task("arithmetic", "messages: [{role, content}, ...] through the tokenizer's chat "
                      "template (a base model without one: template: llama3, qwen, ...)", [
            {"messages": [{"role": "user", "content": f"What is {a} plus {a + 3}?"},
                          {"role": "assistant", "content": f"{2 * a + 3}."}]} for a in range(8)]),
        "completion": _task("opposites", "prompt, completion (trained verbatim)", [
            {"prompt": f"The opposite of {a} is", "completion": f" {b}."} for a, b in opposites]),
        "text": _task("notes", "text (every token trained; long texts are cut into pieces)", [
            {"text": f"A rank-{r} adapter on a {d}-wide layer trains {2 * r * d} numbers instead of {d * d}."}
            for r, d in zip((2, 4, 8, 16) * 2, (256, 256, 512, 512, 1024, 1024, 2048, 2048))]),
    }


def _task(name: str, fields: str, rows: list[dict[str, Any]], **keys: Any) -> dict[str, Any]:
    return {"name": name, "about": f"{name}: {fields}", "rows": rows, "keys": keys}
