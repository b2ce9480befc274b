"""BIG-bench task files: one reader, one set of checks, one prompt, for training rows and eval.

    task = load_bigbench("data/bigbench/physics")        # a task.json, its folder, or a BBH .json
    rows = bigbench_rows(task)                           # training: knowledge rows
    prompt = bigbench_prompt(task, example, shots)       # evaluation: BIG-bench's few-shot prompt

`load_bigbench` checks a file once for both uses: a non-empty `examples` list, each example with an
`input` and an answer (a `target`, or `target_scores` mapping choices to numbers); anything else
is a UserError naming the example. A training row's question is `bigbench_prompt` with no shots,
so a model is scored on exactly the prompts it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from rlora_cli.data.textfiles import TEXT_ENCODING, not_utf8
from rlora_cli.errors import UserError

ANSWER_NEEDED = "needs `input` and `target` or `target_scores`"


# ---- reading and checking ------------------------------------------------------------------------

def bigbench_file(path: str | Path) -> Path:
    """The task file of a source: a folder's task.json, else the path itself."""
    p = Path(path).expanduser()
    return p / "task.json" if p.is_dir() else p


def load_bigbench(path: str | Path) -> dict[str, Any]:
    """A BIG-bench task.json (or the folder that holds it) or a BBH .json file, checked."""
    file = bigbench_file(path)
    if not file.is_file():
        raise UserError(f"no BIG-bench task file at {file}", "give a task.json or the folder that holds it")
    try:
        task = json.loads(file.read_text(encoding=TEXT_ENCODING))
    except UnicodeDecodeError:
        raise not_utf8(file) from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})",
                        "give a BIG-bench task.json or a BBH .json") from None
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise UserError(f"{file}: no `examples` list; not a BIG-bench JSON task",
                        "give a task.json with examples (programmatic BIG-bench tasks, and parents "
                        "of subtasks, hold none: give a subtask's folder)")
    for i, ex in enumerate(examples):
        problem = example_problem(ex)
        if problem:
            raise UserError(f"{file}: example {i} {problem}",
                            "fix the example (BIG-bench's JSON task format)")
    return task


def example_problem(example: Any) -> str | None:
    """Why an example cannot be trained on or scored, or None. An empty `target_scores` with no
    `target` is refused rather than skipped, so training and evaluation see the same examples."""
    if not isinstance(example, dict) or "input" not in example:
        return ANSWER_NEEDED
    scores = example.get("target_scores")
    if scores is not None and not (isinstance(scores, dict) and all(
            isinstance(v, (int, float)) for v in scores.values())):
        return "has a `target_scores` that is not a mapping of choices to numbers"
    if not (bigbench_choices(example) or bigbench_targets(example)):
        return ANSWER_NEEDED + " (an empty one gives nothing to answer)"
    return None


def bigbench_files(path: str | Path) -> dict[str, Path]:
    """{task name: file} for a task.json / BBH .json file, or a folder of task folders and files.
    Inside a folder, JSON files without `examples` are skipped: a BIG-bench task with subtasks
    keeps only its metadata in its own task.json (its subtasks are found beside it)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path}: no such file or folder",
                        "give a BIG-bench task.json, a BBH .json file, or a folder of them")
    if path.is_file():
        return {path.parent.name if path.name == "task.json" else path.stem: path}
    if (path / "task.json").is_file() and _has_examples(path / "task.json"):
        return {path.name: path / "task.json"}
    files = {p.stem: p for p in sorted(path.glob("*.json")) if _has_examples(p)}
    for p in sorted(path.rglob("task.json")):  # task folders, and subtask folders inside them
        if _has_examples(p):
            files[p.parent.relative_to(path).as_posix()] = p
    if not files:
        raise UserError(f"--data {path}: no task.json or .json task files with examples in it",
                        "give a BIG-bench task folder, a BBH .json file, or a folder of them")
    return dict(sorted(files.items()))


def _has_examples(file: Path) -> bool:
    """False only for a readable JSON mapping without `examples` (a parent of subtasks); a file
    that cannot be read stays in, so `load_bigbench` reports what is wrong with it."""
    try:
        task = json.loads(file.read_text(encoding=TEXT_ENCODING))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True
    return not isinstance(task, dict) or "examples" in task


def bigbench_rows(task: dict[str, Any]) -> list[dict[str, Any]]:
    """Knowledge rows of a checked task, one per example in file order: question = BIG-bench's
    prompt (no shots); multiple choice (any example with target_scores) answers with the first
    best-scored choice, free-form with the first target."""
    rows = []
    for ex in task["examples"]:
        choices = [str(c) for c in bigbench_choices(ex) or []]
        targets = bigbench_targets(ex) if ex.get("target") is not None else []  # the file's own targets
        best = bigbench_best_choice(ex) if choices else -1
        rows.append({"question": bigbench_prompt(task, ex, []),
                     "answer": choices[best] if choices else targets[0],  # checked: one of the two exists
                     "choices": choices, "answer_index": best, "targets": targets, "format": "bigbench"})
    return rows


# ---- answers and prompts -------------------------------------------------------------------------

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
