"""Benchmark data and prompts, pure Python (no torch): MMLU and BIG-bench task files.

MMLU (`load_mmlu`, `mmlu_prompt`): hub `cais/mmlu` or a local folder of `dev` and `test` files,
the standard 5-shot prompt (Hendrycks et al.'s format). BIG-bench (`load_bigbench`, `bigbench_prompt`,
`bigbench_choices`, `bigbench_targets`,
`bigbench_best_choice`): a BIG-bench `task.json` or a BBH `.json`, the prompt
BIG-bench's own `default_format_fn` builds. `bigbench_prompt` is shared with the training data
loader (`format: bigbench` sources), so a model is trained and evaluated on the same text.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from rlora_cli.errors import UserError, first_line

LETTERS = "ABCD"
MMLU_COLUMNS = ("question", "subject", "choices", "answer")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# --------------------------------------------------------------------------------------- MMLU


def mmlu_question(row: dict[str, Any]) -> str:
    """One question block, ending in "Answer:" (a shot adds " {letter}\\n\\n")."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    return f"{row['question'].strip()}{options}\nAnswer:"


def mmlu_prompt(subject: str, question: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """The standard MMLU prompt: header, the shots with their answers, then the question."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    body = "".join(f"{mmlu_question(s)} {LETTERS[s['answer']]}\n\n" for s in shots)
    return header + body + mmlu_question(question)


def load_mmlu(data: str | None, subjects: list[str] | None, shots: int) -> dict[str, tuple[list, list]]:
    """{subject: (dev rows, test rows)} from a local folder (`data`) or the hub's cais/mmlu."""
    splits = _mmlu_local(Path(data), shots) if data else _mmlu_hub(subjects, shots)
    by_subject: dict[str, tuple[list, list]] = {}
    for split, rows in zip(("dev", "test"), splits):
        for row in rows:
            by_subject.setdefault(row["subject"], ([], []))[split == "test"].append(row)
    known = sorted(s for s, (_, test) in by_subject.items() if test)
    if subjects:
        unknown = [s for s in subjects if s not in known]
        if unknown:
            raise UserError(f"unknown MMLU subject(s): {', '.join(unknown)}",
                            f"pick from: {', '.join(known[:8])}{', …' if len(known) > 8 else ''} "
                            f"({len(known)} subjects)")
        known = [s for s in known if s in subjects]
    if not known:
        raise UserError("the MMLU test split has no questions", "check --data")
    for subject in known:
        if len(by_subject[subject][0]) < shots:
            raise UserError(f"--shots {shots} is more than the {len(by_subject[subject][0])} dev "
                            f"questions of MMLU subject {subject}", "lower --shots (MMLU's dev split has 5)")
    return {s: by_subject[s] for s in known}


def _mmlu_local(folder: Path, shots: int) -> tuple[list, list]:
    if not folder.exists():
        raise UserError(f"--data {folder}: no such file or folder", "give a folder holding dev and test files")
    if not folder.is_dir():  # one file: its `split` column says dev or test
        rows = read_table(folder)
        if not rows or "split" not in rows[0]:
            raise UserError(f"--data {folder} is one file without a `split` column (dev/test)",
                            "give a folder holding dev and test files (.jsonl/.json/.csv/.parquet)")
        return tuple([_mmlu_row(r, folder, i) for i, r in enumerate(rows) if r.get("split") == s]
                     for s in ("dev", "test"))  # type: ignore[return-value]
    found = {split: [p for p in sorted(folder.iterdir()) if p.suffix in TABLE_SUFFIXES
                     and (p.stem == split or p.stem.startswith(split + "-"))] for split in ("dev", "test")}
    if not found["test"] or (shots and not found["dev"]):
        missing = [s for s in ("dev", "test") if not found[s] and (s == "test" or shots)]
        raise UserError(f"--data {folder}: no {' or '.join(missing)} file",
                        "name them dev.jsonl and test.jsonl (or .json/.csv/.parquet)")
    return tuple([_mmlu_row(r, p, i) for p in found[s] for i, r in enumerate(read_table(p))]
                 for s in ("dev", "test"))  # type: ignore[return-value]


def _mmlu_hub(subjects: list[str] | None, shots: int) -> tuple[list, list]:
    import datasets

    configs = subjects or ["all"]
    out: tuple[list, list] = ([], [])
    for config in configs:
        for k, split in enumerate(("dev", "test")):
            if split == "dev" and not shots:
                continue
            try:
                ds = datasets.load_dataset("cais/mmlu", config, split=split)
            except ValueError as e:  # an unknown config name
                if subjects:
                    raise UserError(f"unknown MMLU subject: {config} ({first_line(e)})",
                                    "use the subject names of cais/mmlu, e.g. abstract_algebra") from None
                raise
            except (OSError, ConnectionError) as e:
                raise UserError(f"cannot load cais/mmlu from the hub: {first_line(e)}",
                                "go online, or download it and pass --data FOLDER (dev and test files)") from None
            out[k].extend(_mmlu_row(r, Path("cais/mmlu"), i) for i, r in enumerate(ds))
    return out


def _mmlu_row(row: dict[str, Any], path: Path, index: int) -> dict[str, Any]:
    missing = [c for c in MMLU_COLUMNS if c not in row]
    if missing:
        raise UserError(f"{path}: row {index} has no {', '.join(missing)} column",
                        f"MMLU files need the columns {', '.join(MMLU_COLUMNS)}")
    choices = row["choices"]
    if isinstance(choices, str):  # CSV cells hold a JSON or Python list
        choices = _parse_list(choices)
    answer = row["answer"]
    if isinstance(answer, str):
        answer = LETTERS.index(answer.strip()) if answer.strip() in LETTERS else int(answer)
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or answer not in range(4):
        raise UserError(f"{path}: row {index}: choices must be 4 strings and answer 0-3 or A-D "
                        f"(got {choices!r}, {row['answer']!r})", "fix the row")
    return {"question": str(row["question"]), "subject": str(row["subject"]),
            "choices": [str(c) for c in choices], "answer": int(answer)}


def _parse_list(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (a list, or {"data"|"rows"|"examples": list}), .csv or .parquet file."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                return list(csv.DictReader(f))
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({first_line(e)})",
                        "give a valid .jsonl, .json, .csv or .parquet file") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "rows", "examples") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a list of objects", "give one JSON object per row")
    return data


# --------------------------------------------------------------------------------- BIG-bench


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
