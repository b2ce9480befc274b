"""MMLU data and prompts (no model here; `run.run_mmlu` scores them).

    subjects = load_mmlu("mmlu/", ["astronomy"], shots=5)     # or load_mmlu(None, ...): hub cais/mmlu
    prompt = mmlu_prompt("astronomy", question, dev[:5])

`load_mmlu` reads hub `cais/mmlu` or a local folder of `dev` and `test` files (.jsonl, .json, .csv,
.parquet); `mmlu_prompt` is the standard 5-shot prompt (Hendrycks et al.'s format). BIG-bench files
live in `data/bigbench.py`, shared with training.
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from rlora_cli.data.textfiles import TEXT_ENCODING, iter_jsonl, not_utf8
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
    topic = subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
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
        raise UserError(f"--data {folder}: no such file or folder",
                        "give a folder holding dev and test files")
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
                                "go online, or download it and pass --data FOLDER (dev and test "
                                "files)") from None
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
            return pq.read_table(path).to_pylist()
        if path.suffix == ".csv":
            with path.open(newline="", encoding=TEXT_ENCODING) as f:
                return list(csv.DictReader(f))
        if path.suffix == ".jsonl":
            return [row for _, row in iter_jsonl(path)]
        data = json.loads(path.read_text(encoding=TEXT_ENCODING))
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({first_line(e)})",
                        "give a valid .jsonl, .json, .csv or .parquet file") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "rows", "examples") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a list of objects", "give one JSON object per row")
    return data
