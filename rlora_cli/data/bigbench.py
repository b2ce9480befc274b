"""BIG-bench task files: reading them, and the prompts training rows and eval questions share.

One module for both uses, so a model is scored on exactly the prompts it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rlora_cli.errors import UserError


def bigbench_choices(example: dict[str, Any]) -> list[str] | None:
    """The candidate answers of a multiple-choice example (target_scores' keys, in file order)."""
    scores = example.get("target_scores")
    return list(scores) if isinstance(scores, dict) and scores else None


def bigbench_targets(example: dict[str, Any]) -> list[str]:
    """Accepted answers: `target` (a string or a list), else the best-scored choices."""
    target = example.get("target")
    if target is not None:
        return [str(t) for t in target] if isinstance(target, list) else [str(target)]
    scores = example.get("target_scores") or {}
    best = max(scores.values(), default=None)
    return [c for c, s in scores.items() if s == best]


def bigbench_best_choice(example: dict[str, Any]) -> int | None:
    """Index of the first best-scored choice of a multiple-choice example (None for free-form)."""
    choices = bigbench_choices(example)
    if not choices:
        return None
    scores = example["target_scores"]
    return max(range(len(choices)), key=lambda i: (scores[choices[i]], -i))


def bigbench_answer(example: dict[str, Any]) -> str:
    """The answer a shot shows, as BIG-bench picks it: `target` (the first, if a list), else the
    first best-scored choice."""
    if example.get("target") is not None:
        return bigbench_targets(example)[0]
    return bigbench_choices(example)[bigbench_best_choice(example)]  # type: ignore[index]


def choice_order(example: dict[str, Any]) -> list[str]:
    """The choices as the prompt lists them: shuffled, as BIG-bench does, but seeded by the
    example's input so every run, training and evaluation alike, shows the same order. Task files
    often list the right answer first (every `physics` example); file order would let a model
    learn the position instead of the answer."""
    choices = bigbench_choices(example) or []
    seed = int.from_bytes(hashlib.sha256(str(example["input"]).encode()).digest()[:8], "big")
    random.Random(seed).shuffle(choices)
    return choices


def _format_input(task: dict[str, Any], example: dict[str, Any]) -> str:
    text = str(example["input"])
    choices = choice_order(example)
    if choices and task.get("append_choices_to_input", True):
        prefix = task.get("choice_prefix", "\n  choice: ")
        text += prefix + prefix.join(choices)
    return task.get("example_input_prefix", "\nQ: ") + text + task.get("example_output_prefix", "\nA: ")


def bigbench_prompt(task: dict[str, Any], example: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """BIG-bench's prompt for `example`, after `shots` shown with their answers.

    task_prefix + example_input_prefix ("\\nQ: ") + input [+ choice_prefix ("\\n  choice: ") +
    each choice, unless append_choices_to_input is false] + example_output_prefix ("\\nA: ");
    shots come first, each followed by its answer, joined by few_shot_example_separator ("\\n").
    Choices are listed in `choice_order`: shuffled deterministically per example.
    """
    parts = [_format_input(task, s) + bigbench_answer(s) for s in shots] + [_format_input(task, example)]
    return task.get("task_prefix", "") + task.get("few_shot_example_separator", "\n").join(parts)


def bigbench_files(path: str | Path) -> dict[str, Path]:
    """{task name: file} for a task.json / BBH .json file, or a folder of task folders and files."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path}: no such file or folder",
                        "give a BIG-bench task.json, a BBH .json file, or a folder of them")
    if path.is_file():
        return {path.parent.name if path.name == "task.json" else path.stem: path}
    if (path / "task.json").is_file():
        return {path.name: path / "task.json"}
    files = {p.stem: p for p in sorted(path.glob("*.json"))}
    for p in sorted(path.rglob("task.json")):  # task folders, and subtask folders inside them
        files[p.parent.relative_to(path).as_posix()] = p
    if not files:
        raise UserError(f"--data {path}: no task.json or .json task files in it",
                        "give a BIG-bench task folder, a BBH .json file, or a folder of them")
    return dict(sorted(files.items()))


def load_bigbench(path: str | Path) -> dict[str, Any]:
    """A BIG-bench or BBH task file, checked: `examples` with `input` and `target` or `target_scores`."""
    path = Path(path)
    try:
        task = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})",
                        "give a BIG-bench task.json or a BBH .json") from None
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise UserError(f"{path}: no `examples` list",
                        'a task file is {"examples": [{"input": ..., "target": ...}]}')
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "input" not in ex or not (
                "target" in ex or bigbench_choices(ex)):
            raise UserError(f"{path}: example {i} needs `input` and `target` or `target_scores`",
                            "fix the example (BIG-bench's JSON task format)")
    return task
