"""`rlora eval` on MMLU and BIG-bench: accuracies against one-by-one references, results files,
bad input as one line before any model loads, the lm-eval install hint, and the CLI layout."""

from __future__ import annotations

import json
import sys

import evalkit
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIGBENCH_FIXTURES
from evalkit import RESULT_KEYS, quiet, reference_generate, reference_loglik, results_file, write_jsonl
from typer.testing import CliRunner

from rlora_cli.cli import app
from rlora_cli.data.bigbench import bigbench_prompt, load_bigbench
from rlora_cli.errors import UserError
from rlora_cli.eval import run as ev
from rlora_cli.eval.benchmarks import load_mmlu, mmlu_prompt
from rlora_cli.eval.results import compare
from rlora_cli.model import load_with_adapter

BIGBENCH = BIGBENCH_FIXTURES
one_thread, mmlu_dir = evalkit.one_thread, evalkit.mmlu_dir  # shared fixtures


# --------------------------------------------------------------------------------------- MMLU


def test_mmlu_accuracy_equals_reference_one_question_at_a_time(lm, mmlu_dir):
    model, tok = lm
    data = load_mmlu(str(mmlu_dir), None, shots=2)
    assert list(data) == ["astronomy", "high_school_biology"]
    result = ev.run_mmlu(model, tok, data, shots=2, batch_size=8, console=quiet())
    for subject, (dev, test) in data.items():
        correct = []
        for q in test:
            prompt = mmlu_prompt(subject, q, dev[:2])
            scores = [reference_loglik(model, tok, prompt, f" {letter}") for letter in "ABCD"]
            correct.append(scores.index(max(scores)) == q["answer"])
        assert result[subject] == {"accuracy": sum(correct) / len(correct), "n": len(test)}
    assert ev.run_mmlu(model, tok, data, shots=2, batch_size=1, console=quiet()) == result


def test_mmlu_local_formats_agree(tmp_path, mmlu_dir):
    rows = {s: [json.loads(x) for x in (mmlu_dir / f"{s}.jsonl").read_text().splitlines()]
            for s in ("dev", "test")}
    (tmp_path / "csv").mkdir()
    (tmp_path / "pq").mkdir()
    for split, rs in rows.items():
        lines = ["question,subject,choices,answer"] + [
            f"\"{r['question']}\",{r['subject']},"
            f"\"{json.dumps(r['choices']).replace(chr(34), chr(34) * 2)}\",{'ABCD'[r['answer']]}" for r in rs]
        (tmp_path / "csv" / f"{split}.csv").write_text("\n".join(lines) + "\n")
        pq.write_table(pa.Table.from_pylist(rs), tmp_path / "pq" / f"{split}-00000-of-00001.parquet")
    expected = load_mmlu(str(mmlu_dir), None, 3)
    assert load_mmlu(str(tmp_path / "csv"), None, 3) == expected
    assert load_mmlu(str(tmp_path / "pq"), ["astronomy"], 3) == {"astronomy": expected["astronomy"]}


def test_evaluate_mmlu_writes_the_results_file(tiny_model_dir, mmlu_dir, tmp_path):
    out = tmp_path / "sub" / "mmlu.json"
    results = ev.evaluate("mmlu", model=str(tiny_model_dir), data=str(mmlu_dir), shots=2, limit=3,
                          dtype="float32", output=str(out), console=quiet())
    saved = json.loads(out.read_text())
    assert saved == results
    assert set(saved) == RESULT_KEYS
    assert saved["task"] == "mmlu" and saved["model"] == str(tiny_model_dir) and saved["adapter"] is None
    assert (saved["shots"], saved["limit"], saved["n"]) == (2, 3, 6)
    tasks = saved["tasks"]
    assert set(tasks) == {"astronomy", "high_school_biology"} and all(t["n"] == 3 for t in tasks.values())
    accs = [t["accuracy"] for t in tasks.values()]
    assert saved["mean_accuracy"] == pytest.approx(sum(accs) / 2)
    assert saved["accuracy"] == pytest.approx(sum(a * 3 for a in accs) / 6)
    assert saved["wall_s"] > 0 and isinstance(saved["rlora_version"], str)


# ---------------------------------------------------------------------------------- BIG-bench


def test_bigbench_multiple_choice_and_exact_match_against_references(lm, tmp_path):
    model, tok = lm
    task = {"task_prefix": "Answer the question.", "examples": [
        {"input": "Is the sun hot?", "target_scores": {"yes": 1, "no": 0}},
        {"input": "Which is an animal?", "target_scores": {"tree": 0, "cat": 1, "river": 0}},
        {"input": "What color is the sky?", "target_scores": {"blue": 1, "red": 0}, "target": "blue"},
        {"input": "Pick a number", "target_scores": {"one": 0.5, "two": 1, "three": 0}},
        {"input": "Name a dog", "target": "?"},
        {"input": "Name a cat", "target": ["?", "?"]},
        {"input": "Say red", "target": "?"},
    ]}
    # Free-form targets: the reference greedy decode for two of the three (prompts do not depend
    # on targets with 0 shots), so exact match must find exactly those two.
    free = [ex for ex in task["examples"] if "target_scores" not in ex]
    decoded = [reference_generate(model, tok, bigbench_prompt(task, ex, [])) for ex in free]
    free[0]["target"] = f"  {decoded[0]} "  # compared stripped
    free[1]["target"] = ["never this", decoded[1]]
    free[2]["target"] = decoded[2] + " not"
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(task))
    expected = []
    for ex in task["examples"][:4]:
        prompt = bigbench_prompt(task, ex, [])
        ll = {c: reference_loglik(model, tok, prompt, c) for c in ex["target_scores"]}
        best = max(ll, key=ll.get)
        expected.append(ex["target_scores"][best] == max(ex["target_scores"].values()))
    expected += [True, True, False]
    for batch_size in (1, 8):
        result = ev.run_bigbench(model, tok, {"mixed": load_bigbench(path)}, batch_size=batch_size,
                                 console=quiet())
        assert result["mixed"] == {"accuracy": sum(expected) / 7, "n": 7, "multiple_choice": 4,
                                   "exact_match": 3}


def test_bigbench_folder_with_shots_and_limit(tiny_model_dir, tmp_path):
    results = ev.evaluate("bbh", model=str(tiny_model_dir), data=str(BIGBENCH), shots=1, limit=2,
                          dtype="float32", output=str(tmp_path / "bbh.json"), console=quiet())
    assert set(results) == RESULT_KEYS and json.loads((tmp_path / "bbh.json").read_text()) == results
    assert (results["shots"], results["limit"]) == (1, 2)
    # every task folder, a subtask by its path; free-form tasks by exact match; target_scores wins
    # over a target (table_lookup has both)
    counts = {name: (t["n"], t["multiple_choice"], t["exact_match"]) for name, t in results["tasks"].items()}
    assert counts == {
        "answer_first": (2, 2, 0), "count_items": (2, 0, 2), "plausibility": (2, 2, 0),
        "several_correct": (2, 2, 0), "spell_backwards": (2, 0, 2), "table_lookup": (2, 2, 0),
        "word_kinds/nouns": (2, 2, 0)}
    assert results["n"] == 14 and all(0 <= t["accuracy"] <= 1 for t in results["tasks"].values())


def test_bigbench_single_file_limit(tiny_model_dir):
    results = ev.evaluate("bbh", model=str(tiny_model_dir), data=str(BIGBENCH / "table_lookup" / "task.json"),
                          limit=3, dtype="float32", console=quiet())
    assert list(results["tasks"]) == ["table_lookup"] and results["n"] == 3 and results["shots"] == 0



# ------------------------------------------------------------------------------------- lm-eval


def test_lm_eval_missing_gives_the_install_hint(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(UserError, match=r"pip install 'rlora\[eval\]'"):
        ev.evaluate("hellaswag", backend="lm-eval", model=str(tiny_model_dir), console=quiet())



# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path, mmlu_dir, tiny_model_dir):
    m = str(tiny_model_dir)

    def fails(match, fn, *args, **kw):
        with pytest.raises(UserError, match=match) as info:
            fn(*args, **kw)
        assert "\n" not in info.value.message, "one line"

    fails("no such file", ev.evaluate, "mmlu", model=m, data=str(tmp_path / "nope"), console=quiet())
    write_jsonl(tmp_path / "dev.jsonl",
                [{"question": "q", "subject": "s", "choices": ["a"] * 4, "answer": 0}] * 5)
    write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "subject": "s", "answer": 0}])
    fails("no choices column", ev.evaluate, "mmlu", model=m, data=str(tmp_path), console=quiet())
    fails("--shots 4 is more than the 3 dev", ev.evaluate, "mmlu", model=m, data=str(mmlu_dir), shots=4,
          console=quiet())
    fails("unknown MMLU subject.*virology", ev.evaluate, "mmlu", model=m, data=str(mmlu_dir),
          subjects=["astronomy", "virology"], console=quiet())
    fails("unknown task 'hellaswag'", ev.evaluate, "hellaswag", model=m, console=quiet())
    fails("cannot load cais/mmlu from the hub", ev.evaluate, "mmlu", model=m, console=quiet())  # offline
    fails("not an rlora adapter", ev.evaluate, "mmlu", model=m, data=str(mmlu_dir), shots=2,
          adapter=str(tmp_path), console=quiet())
    fails("no such adapter directory", load_with_adapter, m, str(tmp_path / "none"))
    fails("--task bbh needs --data", ev.evaluate, "bbh", model=m, console=quiet())
    (tmp_path / "bad.json").write_text(json.dumps({"examples": [{"input": "x"}]}))
    fails("example 0 needs `input` and `target` or `target_scores`", ev.evaluate, "bbh", model=m,
          data=str(tmp_path / "bad.json"), console=quiet())
    (tmp_path / "empty.json").write_text(json.dumps({"name": "x"}))
    fails("no `examples` list", ev.evaluate, "bbh", model=m, data=str(tmp_path / "empty.json"),
          console=quiet())
    fails(r"--shots 12 leaves no example of task plausibility to score \(12 examples\)", ev.evaluate, "bbh",
          model=m, data=str(BIGBENCH / "plausibility"), shots=12, console=quiet())
    fails("--limit must be at least 1", ev.evaluate, "mmlu", model=m, limit=0, console=quiet())
    (tmp_path / "wrong.json").write_text(json.dumps({"accuracy": 0.5, "tasks": {"a": 0.5}}))
    good = results_file(tmp_path / "good.json", {"a": 0.5})
    fails("not an rlora results file", compare, good, tmp_path / "wrong.json", console=quiet())
    fails("no such results file", compare, good, tmp_path / "missing.json", console=quiet())



# --------------------------------------------------------------------------- the CLI layout


def test_cli_layout_runs_eval_and_compare(tiny_model_dir, mmlu_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--task", "mmlu", "--model", str(tiny_model_dir),
                              "--data", str(mmlu_dir), "--shots", "1", "--limit", "2",
                              "--subjects", "astronomy", "--dtype", "float32", "--output", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert list(saved["tasks"]) == ["astronomy"] and saved["n"] == 2 and saved["shots"] == 1
    res = runner.invoke(app, ["eval", "compare", str(out), str(out), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert "+0.0000" in res.output and (tmp_path / "p.png").exists()
    res = runner.invoke(app, ["eval"])
    assert isinstance(res.exception, UserError) and "needs --task" in str(res.exception)
    res = runner.invoke(app, ["eval", "--help"])
    assert res.exit_code == 0 and "compare" in res.output and "--task" in res.output



# ------------------------------------------------------------------------------ output paths


def test_eval_output_checks_come_before_any_work(tiny_model_dir, tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "plain").write_text("x")
    with pytest.raises(UserError, match="is a folder"):
        ev.evaluate("mmlu", model=str(tiny_model_dir), output=str(tmp_path / "here"), console=quiet())
    with pytest.raises(UserError, match="plain is a file, not a folder"):
        ev.evaluate("mmlu", model=str(tiny_model_dir), output=str(tmp_path / "plain" / "r.json"),
                    console=quiet())
