"""One BIG-bench reader: the same checks for training rows and eval prompts, subtask folders found."""

from __future__ import annotations

import json

import pytest

from rlora_cli.config import DatasetConfig
from rlora_cli.data.bigbench import bigbench_files, bigbench_rows, load_bigbench
from rlora_cli.data.sources import check_source
from rlora_cli.errors import UserError


def write_task(path, examples, **task):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": path.parent.name, **task, "examples": examples}))
    return path


NEEDS = "example 1 needs `input` and `target` or `target_scores`"


@pytest.mark.parametrize("example, problem", [
    ({"input": "x"}, NEEDS),
    ({"input": "x", "target_scores": {}}, NEEDS + " (an empty"),  # the row reader used to drop it silently
    ({"input": "x", "target": []}, NEEDS + " (an empty"),
    ({"target": "y"}, "example 1 needs `input`"),
    ({"input": "x", "target_scores": {"a": "high"}}, "example 1 has a `target_scores` that is not a mapping"),
])
def test_training_and_eval_refuse_the_same_examples(tmp_path, example, problem):
    file = write_task(tmp_path / "t" / "task.json", [{"input": "ok", "target": "yes"}, example])
    with pytest.raises(UserError, match=problem.replace("(", r"\(").replace("[", r"\[")):
        load_bigbench(file)  # what the evaluator reads
    source = DatasetConfig(path=str(file.parent), kind="knowledge", format="bigbench")
    [found] = check_source(source, "data.datasets[0]")  # what the recipe check reads
    assert found.startswith("data.datasets[0].path: ") and problem in found


def test_rows_take_the_answer_each_kind_of_example_gives():
    task = {"examples": [{"input": "2+2", "target_scores": {"3": 0, "4": 1, "four": 1}},
                         {"input": "name", "target": ["Ada", "Lovelace"]},
                         {"input": "both", "target": "b", "target_scores": {"a": 0, "b": 1}}]}
    rows = bigbench_rows(task)
    assert [(r["answer"], r["answer_index"], r["targets"]) for r in rows] == [
        ("4", 1, []), ("Ada", -1, ["Ada", "Lovelace"]), ("b", 1, ["b"])]
    assert all(r["question"].endswith("\nA: ") for r in rows)


def test_parent_of_subtasks_is_skipped(tmp_path):
    parent = tmp_path / "word_kinds"
    parent.mkdir()
    (parent / "task.json").write_text(json.dumps({"name": "word_kinds", "subtasks": ["nouns", "verbs"]}))
    write_task(parent / "nouns" / "task.json", [{"input": "cat", "target": "noun"}])
    write_task(parent / "verbs" / "task.json", [{"input": "run", "target": "verb"}])
    assert set(bigbench_files(parent)) == {"nouns", "verbs"}
    assert set(bigbench_files(tmp_path)) == {"word_kinds/nouns", "word_kinds/verbs"}
    with pytest.raises(UserError, match="no `examples` list"):  # named directly, it is still an error
        load_bigbench(parent)
    (parent / "broken.json").write_text("{")  # unreadable files stay in, so the reader can name them
    assert "broken" in bigbench_files(parent)
