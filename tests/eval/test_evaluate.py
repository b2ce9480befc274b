"""`rlora eval`: prompts string-exact, scores against a one-by-one reference forward, batched equal
to unbatched, BIG-bench scoring against `model.generate`, results files, compare, bad input."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import BIGBENCH_FIXTURES, real_bigbench_task  # noqa: E402
from rich.console import Console
from typer.testing import CliRunner

from rlora_cli.data.bigbench import bigbench_prompt, load_bigbench
from rlora_cli.errors import UserError
from rlora_cli.eval import run as ev
from rlora_cli.eval.benchmarks import load_mmlu, mmlu_prompt
from rlora_cli.eval.scoring import encode_pair, greedy_generate, loglikelihoods

BIGBENCH = BIGBENCH_FIXTURES
RESULT_KEYS = {"task", "model", "adapter", "shots", "limit", "rlora_version", "wall_s", "accuracy",
               "n", "mean_accuracy", "tasks"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on 2 shared cores OpenMP's spinning threads
    make generation 10x slower whenever another process is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from rlora_cli.model import load_model

    model, tokenizer = load_model(str(tiny_model_dir), dtype="float32")
    return model.eval(), tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mmlu_rows(subject: str, n: int, offset: int = 0) -> list[dict]:
    words = ["red", "blue", "green", "cat", "dog", "river", "sun", "moon", "tree", "fish", "city", "star"]
    return [{"question": f"What is {words[(i + offset) % 12]} number {i}?", "subject": subject,
             "choices": [words[(i + k + offset) % 12] for k in range(4)], "answer": (i + offset) % 4}
            for i in range(n)]


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmlu")
    write_jsonl(folder / "dev.jsonl", mmlu_rows("astronomy", 3) + mmlu_rows("high_school_biology", 3, 5))
    write_jsonl(folder / "test.jsonl", mmlu_rows("astronomy", 5, 2) + mmlu_rows("high_school_biology", 4, 7))
    return folder


# ---------------------------------------------------------------------------------- prompts


def test_mmlu_prompt_two_shot_is_string_exact():
    shots = [{"question": "What is 1+1?", "choices": ["1", "2", "3", "4"], "answer": 1},
             {"question": "Which is red?", "choices": ["sky", "grass", "blood", "snow"], "answer": 2}]
    question = {"question": "Which is a planet?", "choices": ["Mars", "Moon", "Sun", "Comet"], "answer": 0}
    expected = (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which is red?\nA. sky\nB. grass\nC. blood\nD. snow\nAnswer: C\n\n"
        "Which is a planet?\nA. Mars\nB. Moon\nC. Sun\nD. Comet\nAnswer:"
    )
    assert mmlu_prompt("high_school_physics", question, shots) == expected


def test_bigbench_prompt_defaults_choices_and_shots():
    task = {"task_prefix": "Pick one.\n"}
    shot = {"input": "2+2?", "target_scores": {"3": 0, "4": 1}}
    example = {"input": "1+1?", "target_scores": {"2": 1, "5": 0}}
    assert bigbench_prompt(task, example, [shot]) == (  # choices in choice_order: shuffled, seeded by the input
        "Pick one.\n"
        "\nQ: 2+2?\n  choice: 4\n  choice: 3\nA: 4"
        "\n"
        "\nQ: 1+1?\n  choice: 5\n  choice: 2\nA: ")
    assert bigbench_prompt({}, {"input": "Say hi", "target": ["hi", "hello"]}, []) == "\nQ: Say hi\nA: "


def check_choice_order_hides_the_first_position(examples: list[dict]) -> None:
    """Examples whose file lists the answer first, always, among four choices."""
    from collections import Counter

    from rlora_cli.data.bigbench import choice_order

    best = [max(e["target_scores"], key=e["target_scores"].get) for e in examples]
    assert all(list(e["target_scores"])[0] == b for e, b in zip(examples, best))
    orders = [choice_order(e) for e in examples]
    assert all(sorted(o) == sorted(e["target_scores"]) for o, e in zip(orders, examples))  # a permutation
    assert orders == [choice_order(e) for e in examples]  # deterministic
    positions = Counter(o.index(b) for o, b in zip(orders, best))
    assert len(positions) == 4 and max(positions.values()) < 0.4 * len(examples)


def test_choice_order_is_a_seeded_shuffle_that_hides_the_file_position():
    task = load_bigbench(BIGBENCH / "answer_first" / "task.json")  # the file lists the answer first, always
    check_choice_order_hides_the_first_position(task["examples"])
    assert bigbench_prompt(task, task["examples"][0], []) == (  # the prompt lists the shuffled order
        "Choose the SI unit of the quantity named in each question.\n\n"
        "\nQ: What is the SI unit of electric current?"
        "\n  choice: pascal\n  choice: volt\n  choice: kelvin\n  choice: ampere\nA: ")


def test_choice_order_on_the_real_physics_task():
    """physics lists the answer first in all of its 229 examples."""
    check_choice_order_hides_the_first_position(load_bigbench(real_bigbench_task("physics"))["examples"])


def test_bigbench_prompt_task_prefixes_without_appended_choices():
    task = {"task_prefix": "T:", "example_input_prefix": "\nStatement: ", "example_output_prefix": " Answer: ",
            "append_choices_to_input": False, "choice_prefix": " | "}
    shots = [{"input": "a", "target": "x", "target_scores": {"y": 1, "x": 0}}]  # `target` wins for shots
    assert bigbench_prompt(task, {"input": "b", "target_scores": {"x": 1}}, shots) == (
        "T:\nStatement: a Answer: x\n\nStatement: b Answer: ")


def test_bigbench_prompt_task_file_fields():
    task = load_bigbench(BIGBENCH / "plausibility" / "task.json")  # its own prefixes, choices not appended
    shot, ex = task["examples"][:2]
    assert bigbench_prompt(task, ex, []) == (
        "Say whether each statement describes something that could really happen:"
        "\nClaim: The swimmer finished the last lap on horseback.\nPossible or impossible? ")
    assert bigbench_prompt(task, ex, [shot]) == (
        "Say whether each statement describes something that could really happen:"
        "\nClaim: The goalkeeper caught the ball with both hands.\nPossible or impossible? possible"
        "\n"
        "\nClaim: The swimmer finished the last lap on horseback.\nPossible or impossible? ")
    task = load_bigbench(BIGBENCH / "several_correct" / "task.json")  # its own choice prefix and separator
    shot, ex = task["examples"][:2]
    assert bigbench_prompt(task, ex, [shot]) == (  # the shot shows the first best-scored choice in file order
        "Pick an answer that fits.\n"
        "\nQ: Which of these numbers is even?\n  option: 9\n  option: 10\n  option: 4\n  option: 7\nA: 4"
        "\n\n"
        "\nQ: Which animal can fly?\n  option: trout\n  option: bat\n  option: cat\n  option: sparrow\nA: ")
    task = load_bigbench(BIGBENCH / "count_items" / "task.json")  # free-form: a shot shows the first target
    shot, ex = task["examples"][:2]
    assert bigbench_prompt(task, ex, [shot]) == (
        "\nQ: I packed a towel, two books and a hat. How many things did I pack?\nA: 4"
        "\n"
        "\nQ: On the shelf are a clock and a vase. How many objects are on the shelf?\nA: ")


# ---------------------------------------------------------------------------------- scoring


def reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Plain forward on the whole text; lm-eval's rule: trailing context spaces go to the continuation."""
    stripped = context.rstrip()
    ids = tokenizer(context + continuation)["input_ids"]
    n_ctx = len(tokenizer(stripped)["input_ids"])
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))


def test_encode_pair_moves_trailing_space_to_the_continuation(lm):
    _, tok = lm
    ctx, cont = encode_pair(tok, "Q: red cat\nA: ", "yes")
    assert ctx == tok("Q: red cat\nA:")["input_ids"]
    assert ctx + cont == tok("Q: red cat\nA: yes")["input_ids"]


def test_loglikelihoods_match_reference_and_batching(lm):
    model, tok = lm
    single = ["A", "B", "C", "D"]  # one byte-level token each after ":" (the tiny BPE splits " A")
    assert all(len(encode_pair(tok, "Red blue:", c)[1]) == 1 for c in single)
    requests = [
        ("The following is a question about the sun.\nAnswer:", [" A", " B", " C", " D"]),
        ("Q: how many dogs\nA: ", ["three", "two dogs", "3"]),
        ("Red blue:", single),  # every candidate one token: one pass over the context
        ("x", ["y z"]),
        ("A much longer context " * 12, [" end", " of the text."]),
    ]
    batched = loglikelihoods(model, tok, requests, batch_size=16)
    one = loglikelihoods(model, tok, requests, batch_size=1)
    for (context, conts), row_b, row_1 in zip(requests, batched, one):
        for cont, b, o in zip(conts, row_b, row_1):
            assert b.n_tokens == o.n_tokens and b.n_tokens >= 1
            assert b.logprob == pytest.approx(o.logprob, abs=1e-5)
            assert b.logprob == pytest.approx(reference_loglik(model, tok, context, cont), abs=1e-4)


def reference_generate(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=64, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in out:
        out = out[:out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True).split("\n", 1)[0]


def test_greedy_generate_matches_model_generate_batched_or_not(lm):
    model, tok = lm
    prompts = ["\nQ: red cat\nA: ", "The sun is", "x",
               "\nQ: a much longer question about the river and the moon?\nA:"]
    reference = [reference_generate(model, tok, p) for p in prompts]
    assert greedy_generate(model, tok, prompts, batch_size=1) == reference
    assert greedy_generate(model, tok, prompts, batch_size=4) == reference


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {s: [json.loads(x) for x in (mmlu_dir / f"{s}.jsonl").read_text().splitlines()] for s in ("dev", "test")}
    (tmp_path / "csv").mkdir()
    (tmp_path / "pq").mkdir()
    for split, rs in rows.items():
        lines = ["question,subject,choices,answer"] + [
            f"\"{r['question']}\",{r['subject']},\"{json.dumps(r['choices']).replace(chr(34), chr(34) * 2)}\","
            f"{'ABCD'[r['answer']]}" for r in rs]
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
        result = ev.run_bigbench(model, tok, {"mixed": load_bigbench(path)}, batch_size=batch_size, console=quiet())
        assert result["mixed"] == {"accuracy": sum(expected) / 7, "n": 7, "multiple_choice": 4, "exact_match": 3}


def test_bigbench_folder_with_shots_and_limit(tiny_model_dir, tmp_path):
    results = ev.evaluate("bbh", model=str(tiny_model_dir), data=str(BIGBENCH), shots=1, limit=2,
                          dtype="float32", output=str(tmp_path / "bbh.json"), console=quiet())
    assert set(results) == RESULT_KEYS and json.loads((tmp_path / "bbh.json").read_text()) == results
    assert (results["shots"], results["limit"]) == (1, 2)
    # every task folder, a subtask by its path; free-form tasks by exact match; target_scores wins
    # over a target (table_lookup has both)
    assert {name: (t["n"], t["multiple_choice"], t["exact_match"]) for name, t in results["tasks"].items()} == {
        "answer_first": (2, 2, 0), "count_items": (2, 0, 2), "plausibility": (2, 2, 0),
        "several_correct": (2, 2, 0), "spell_backwards": (2, 0, 2), "table_lookup": (2, 2, 0),
        "word_kinds/nouns": (2, 2, 0)}
    assert results["n"] == 14 and all(0 <= t["accuracy"] <= 1 for t in results["tasks"].values())


def test_bigbench_single_file_limit(tiny_model_dir):
    results = ev.evaluate("bbh", model=str(tiny_model_dir), data=str(BIGBENCH / "table_lookup" / "task.json"),
                          limit=3, dtype="float32", console=quiet())
    assert list(results["tasks"]) == ["table_lookup"] and results["n"] == 3 and results["shots"] == 0


# ------------------------------------------------------------------------------------ adapters


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from rlora_cli.adapters import AdapterConfig, inject_adapters
    from rlora_cli.checkpoint import save_adapter
    from rlora_cli.model import load_model

    model, tok = load_model(str(tiny_model_dir), dtype="float32")
    inject_adapters(model, AdapterConfig(type="lora", r=2, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rlora" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", tokenizer=tok), model.eval()


def test_adapter_loads_on_its_recorded_base(adapter_dir, lm):
    path, adapted = adapter_dir
    model, tok, base = ev.load_eval_model(None, str(path), dtype="float32")
    ids = lm[1]("The red cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted(ids).logits)
        assert not torch.allclose(model(ids).logits, lm[0](ids).logits)


def test_adapter_on_another_base_warns_and_refuses_on_shape_mismatch(adapter_dir, tmp_path):
    from rlora_cli.testing import build_tiny_model

    path, _ = adapter_dir
    console = quiet()
    same_shape = build_tiny_model(tmp_path / "copy")
    ev.load_eval_model(str(same_shape), str(path), dtype="float32", console=console)
    assert "warning" in console.file.getvalue() and "was trained on" in console.file.getvalue()
    smaller = build_tiny_model(tmp_path / "small", hidden_size=32)
    with pytest.raises(UserError, match="shape"):
        ev.load_eval_model(str(smaller), str(path), dtype="float32", console=quiet())


# ------------------------------------------------------------------------------------- lm-eval


def test_lm_eval_missing_gives_the_install_hint(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(UserError, match=r"pip install 'rlora\[eval\]'"):
        ev.evaluate("hellaswag", backend="lm-eval", model=str(tiny_model_dir), console=quiet())


def test_lm_eval_results_convert_to_the_results_shape():
    raw = {
        "results": {
            "mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.01, "alias": "mmlu"},
            "mmlu_astronomy": {"alias": " - astronomy", "acc,none": 0.5, "acc_stderr,none": 0.04},
            "mmlu_virology": {"alias": " - virology", "acc,none": 0.25, "acc_stderr,none": 0.03},
            "hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.35, "alias": "hellaswag"},
            "gsm8k": {"exact_match,flexible-extract": 0.2, "exact_match,strict-match": 0.1, "alias": "gsm8k",
                      "exact_match_stderr,strict-match": "N/A"},
        },
        "groups": {"mmlu": {"acc,none": 0.4}},
        "group_subtasks": {"mmlu": ["mmlu_astronomy", "mmlu_virology"], "hellaswag": [], "gsm8k": []},
        "n-samples": {"mmlu_astronomy": {"original": 152, "effective": 10},
                      "mmlu_virology": {"original": 166, "effective": 30},
                      "hellaswag": {"original": 10042, "effective": 10042},
                      "gsm8k": {"original": 1319, "effective": 20}},
    }
    tasks = ev.lm_eval_tasks(raw)
    assert tasks["mmlu_astronomy"] == {"accuracy": 0.5, "n": 10, "acc": 0.5, "acc_stderr": 0.04}
    assert tasks["hellaswag"]["accuracy"] == 0.3 and tasks["hellaswag"]["acc_norm"] == 0.35
    assert tasks["gsm8k"]["accuracy"] == 0.1 and tasks["gsm8k"]["exact_match,flexible-extract"] == 0.2
    assert "mmlu" not in tasks
    results = ev.results_dict("mmlu,hellaswag,gsm8k", "m", None, None, None, 1.0, tasks)
    assert set(results) == RESULT_KEYS and results["n"] == 10 + 30 + 10042 + 20
    assert results["mean_accuracy"] == pytest.approx((0.5 + 0.25 + 0.3 + 0.1) / 4)


# ------------------------------------------------------------------------------------- compare


def results_file(path: Path, accs: dict[str, float | None], **extra) -> Path:
    tasks = {k: {"accuracy": v, "n": 10, **extra.get(k, {})} for k, v in accs.items()}
    path.write_text(json.dumps(ev.results_dict("bbh", "m", None, 0, None, 1.0, tasks)))
    return path


def test_compare_deltas_and_plot(tmp_path):
    a = results_file(tmp_path / "a.json", {"snarks": 0.5, "physics": 0.25, "chat": None}, chat={"loss": 2.0})
    b = results_file(tmp_path / "b.json", {"snarks": 0.75, "physics": 0.125, "chat": None, "new": 1.0},
                     chat={"loss": 1.5})
    console = quiet()
    out = ev.compare(a, b, plot=tmp_path / "plots" / "cmp.png", console=console)
    assert out["tasks"]["snarks"] == {"metric": "accuracy", "a": 0.5, "b": 0.75, "delta": 0.25}
    assert out["tasks"]["physics"]["delta"] == -0.125
    assert out["tasks"]["chat"] == {"metric": "loss", "a": 2.0, "b": 1.5, "delta": -0.5}
    assert out["tasks"]["new"] == {"metric": "accuracy", "a": None, "b": 1.0, "delta": None}
    assert out["mean_accuracy"]["delta"] == pytest.approx((0.75 + 0.125 + 1.0) / 3 - 0.375)
    assert (tmp_path / "plots" / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "+0.2500" in console.file.getvalue()


# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path, mmlu_dir, tiny_model_dir):
    m = str(tiny_model_dir)

    def fails(match, fn, *args, **kw):
        with pytest.raises(UserError, match=match) as info:
            fn(*args, **kw)
        assert "\n" not in info.value.message, "one line"

    fails("no such file", ev.evaluate, "mmlu", model=m, data=str(tmp_path / "nope"), console=quiet())
    write_jsonl(tmp_path / "dev.jsonl", [{"question": "q", "subject": "s", "choices": ["a"] * 4, "answer": 0}] * 5)
    write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "subject": "s", "answer": 0}])
    fails("no choices column", ev.evaluate, "mmlu", model=m, data=str(tmp_path), console=quiet())
    fails("--shots 4 is more than the 3 dev", ev.evaluate, "mmlu", model=m, data=str(mmlu_dir), shots=4,
          console=quiet())
    fails("unknown MMLU subject.*virology", ev.evaluate, "mmlu", model=m, data=str(mmlu_dir),
          subjects=["astronomy", "virology"], console=quiet())
    fails("unknown task 'hellaswag'", ev.evaluate, "hellaswag", model=m, console=quiet())
    fails("cannot load cais/mmlu from the hub", ev.evaluate, "mmlu", model=m, console=quiet())  # offline
    fails("not an rlora adapter", ev.evaluate, "mmlu", model=m, data=str(mmlu_dir), shots=2, adapter=str(tmp_path),
          console=quiet())
    fails("no such adapter directory", ev.load_eval_model, m, str(tmp_path / "none"))
    fails("--task bbh needs --data", ev.evaluate, "bbh", model=m, console=quiet())
    (tmp_path / "bad.json").write_text(json.dumps({"examples": [{"input": "x"}]}))
    fails("example 0 needs `input` and `target` or `target_scores`", ev.evaluate, "bbh", model=m,
          data=str(tmp_path / "bad.json"), console=quiet())
    (tmp_path / "empty.json").write_text(json.dumps({"name": "x"}))
    fails("no `examples` list", ev.evaluate, "bbh", model=m, data=str(tmp_path / "empty.json"), console=quiet())
    fails(r"--shots 12 leaves no example of task plausibility to score \(12 examples\)", ev.evaluate, "bbh",
          model=m, data=str(BIGBENCH / "plausibility"), shots=12, console=quiet())
    fails("--limit must be at least 1", ev.evaluate, "mmlu", model=m, limit=0, console=quiet())
    (tmp_path / "wrong.json").write_text(json.dumps({"accuracy": 0.5, "tasks": {"a": 0.5}}))
    good = results_file(tmp_path / "good.json", {"a": 0.5})
    fails("not an rlora results file", ev.compare, good, tmp_path / "wrong.json", console=quiet())
    fails("no such results file", ev.compare, good, tmp_path / "missing.json", console=quiet())


# --------------------------------------------------------------------------- the CLI layout

from rlora_cli.cli import app  # noqa: E402  (the real command tree, as users call it)


def test_cli_layout_runs_eval_and_compare(tiny_model_dir, mmlu_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--task", "mmlu", "--model", str(tiny_model_dir), "--data", str(mmlu_dir),
                              "--shots", "1", "--limit", "2", "--subjects", "astronomy", "--dtype", "float32",
                              "--output", str(out)])
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


# ---------------------------------------------------------------------------------- recipe task


@pytest.fixture(scope="module")
def recipe_path(tiny_model_dir, tmp_path_factory):
    import yaml

    folder = tmp_path_factory.mktemp("recipe")
    words = ["red", "blue", "green", "cat", "dog", "river", "sun", "moon"]
    write_jsonl(folder / "ops.jsonl", [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in words])
    write_jsonl(folder / "reviews.jsonl", [{"sentence": f"the {w} was good" if i % 2 else f"bad {w}",
                                            "label": i % 2} for i, w in enumerate(words)])
    write_jsonl(folder / "quiz.jsonl", [{"question": f"Which is {w}?", "choices": [w, "tree", "fish"],
                                         "answer": i % 3} for i, w in enumerate(words)])
    write_jsonl(folder / "facts.jsonl", [{"question": f"Color of the {w}?", "answer": w} for w in words])
    write_jsonl(folder / "chats.jsonl", [{"messages": [{"role": "user", "content": f"Say {w}"},
                                                       {"role": "assistant", "content": w}]} for w in words])
    recipe = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
              "adapter": {"type": "lora", "r": 2},
              "data": {"max_length": 128, "datasets": [
                  {"name": "ops", "path": str(folder / "ops.jsonl"), "kind": "instruction", "val_size": 3},
                  {"name": "reviews", "path": str(folder / "reviews.jsonl"), "kind": "nlu", "val_size": 4,
                   "columns": {"text": "sentence"}, "label_words": ["negative", "positive"]},
                  {"name": "quiz", "path": str(folder / "quiz.jsonl"), "kind": "knowledge", "val_size": 4},
                  {"name": "facts", "path": str(folder / "facts.jsonl"), "kind": "knowledge", "val_size": 3},
                  {"name": "chats", "path": str(folder / "chats.jsonl"), "kind": "chat", "val_size": 2},
                  {"name": "claims", "path": str(BIGBENCH / "plausibility" / "task.json"), "format": "bigbench",
                   "val_size": 3},
              ]}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_recipe_eval_reports_every_task_against_references(recipe_path, lm, tmp_path):
    from rlora_cli.data.pipeline import load_splits, tokenize_example
    from rlora_cli.data.templates import choices, gold_index, prompt_and_response, prompt_text
    from rlora_cli.eval.recipe_tasks import token_f1
    from rlora_cli.recipe.load import load_recipe

    model, tok = lm
    results = ev.evaluate("recipe", recipe=str(recipe_path), dtype="float32", batch_size=4,
                          output=str(tmp_path / "recipe.json"), console=quiet())
    assert set(results) == RESULT_KEYS and results["model"] == str(load_recipe(recipe_path).model.name_or_path)
    tasks = results["tasks"]
    assert list(tasks) == ["ops", "reviews", "quiz", "facts", "chats", "claims"]
    assert {k: (v["kind"], v["n"]) for k, v in tasks.items()} == {
        "ops": ("instruction", 3), "reviews": ("nlu", 4), "quiz": ("knowledge", 4), "facts": ("knowledge", 3),
        "chats": ("chat", 2), "claims": ("knowledge", 3)}
    assert results["n"] == 4 + 4 + 3 + 3  # examples with an accuracy
    val = {t: v for t, (_, v) in load_splits(load_recipe(recipe_path)).items()}
    for task in ("reviews", "quiz", "claims"):  # choices by summed log-likelihood
        hits = []
        for ex in val[task]:
            prompt = prompt_and_response(ex, tok)[0]
            scores = [reference_loglik(model, tok, prompt, c) for c in choices(ex, tok)]
            hits.append(scores.index(max(scores)) == gold_index(ex))
        assert tasks[task]["accuracy"] == sum(hits) / len(hits), task
    texts = [reference_generate(model, tok, prompt_text(ex, tok)) for ex in val["facts"]]
    answers = [ex.fields["answer"] for ex in val["facts"]]
    assert tasks["facts"]["accuracy"] == sum(t.strip() == a for t, a in zip(texts, answers)) / 3
    assert tasks["facts"]["f1"] == pytest.approx(sum(token_f1(t, a) for t, a in zip(texts, answers)) / 3)
    for task in ("ops", "chats"):  # loss per trained token, as training tokenizes
        nll = count = 0
        for ex in val[task]:
            e = tokenize_example(ex, tok, max_length=128)
            n = sum(1 for x in e.labels[1:] if x != -100)
            with torch.no_grad():
                nll += model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item() * n
            count += n
        assert tasks[task]["accuracy"] is None and tasks[task]["tokens"] == count
        assert tasks[task]["loss"] == pytest.approx(nll / count, rel=1e-5)
        assert tasks[task]["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-5)


def test_token_f1_and_exact_match():
    from rlora_cli.eval.recipe_tasks import exact_match, token_f1

    assert token_f1("The Eiffel tower", "eiffel tower!") == 1.0
    assert token_f1("red blue", "red green") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0 and token_f1("the", "a") == 1.0
    assert exact_match(" Paris \n", ["London", "Paris"]) and not exact_match("paris", ["Paris"])


def test_run_folder_means_its_adapter_and_recipe(adapter_dir, recipe_path, lm):
    import shutil

    path, _ = adapter_dir
    run = path.parent  # a run folder: RUN/adapter and RUN/recipe.yaml
    assert ev.adapter_dir(str(run)) == str(path) and ev.adapter_dir(str(path)) == str(path)
    shutil.copy(recipe_path, run / "recipe.yaml")
    results = ev.evaluate("recipe", adapter=str(run), dtype="float32", limit=1, console=quiet())
    assert results["adapter"] == str(path) and results["model"] == str(lm[0].name_or_path)
    assert len(results["tasks"]) == 6 and all(t["n"] == 1 for t in results["tasks"].values())


# ------------------------------------------------------------------ compare: every task in the chart


def test_compare_chart_shows_every_task_loss_scored_ones_too(tmp_path):
    """The demo's textops is scored by held-out loss: the chart has a lower-is-better panel for it."""
    a = results_file(tmp_path / "a.json", {"reviews": 0.6, "quiz": 0.18, "textops": None, "chat": None},
                     textops={"loss": 3.93}, chat={"perplexity": 40.0})
    b = results_file(tmp_path / "b.json", {"reviews": 1.0, "quiz": 0.33, "textops": None, "chat": None,
                                           "only_in_b": 0.5}, textops={"loss": 0.62}, chat={"perplexity": 12.0})
    out = ev.compare(a, b, plot=tmp_path / "cmp.png", console=quiet())
    fig = ev.comparison_figure(out, "A", "B")
    try:
        ticks = {t.get_text().split(" (")[0] for ax in fig.axes for t in ax.get_xticklabels()}
        labels = " ".join(ax.get_ylabel() for ax in fig.axes)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    tasks = set(json.loads(a.read_text())["tasks"]) | set(json.loads(b.read_text())["tasks"])
    assert tasks <= ticks and "overall" in ticks
    assert "lower is better" in labels and "higher is better" in labels
    loss_ax = next(ax for ax in fig.axes if "lower" in ax.get_ylabel())
    assert {t.get_text() for t in loss_ax.get_xticklabels()} == {"textops", "chat (perplexity)"}
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_prints_task_names_and_paths_literally(tmp_path):
    folder = tmp_path / "runs[bold]"
    folder.mkdir()
    a = results_file(folder / "a[red].json", {"[bold]x[/]": 0.5, "t[/b]": 0.25})
    console = quiet()
    ev.compare(a, a, console=console)
    text = console.file.getvalue()
    assert "[bold]x[/]" in text and "t[/b]" in text and "runs[bold]/a[red].json" in text


# ------------------------------------------------------------- adapters from anywhere, base gone


def _adapter_over(base: Path, out: Path, **save_kw) -> Path:
    from rlora_cli.adapters import AdapterConfig, inject_adapters
    from rlora_cli.checkpoint import save_adapter
    from rlora_cli.model import load_model

    model, tok = load_model(str(base), dtype="float32")
    inject_adapters(model, AdapterConfig(type="lora", r=2, target_modules=["q_proj"]))
    return save_adapter(model, out, tokenizer=tok, **save_kw)


def test_adapter_saved_from_a_relative_base_loads_from_any_folder(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from rlora_cli.checkpoint import read_adapter_config

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / ".models" / "tiny")
    monkeypatch.chdir(project)
    adapter = _adapter_over(Path(".models/tiny"), Path("runs/demo/adapter"))
    config = read_adapter_config(adapter)
    assert config["base_model"] == str(project / ".models" / "tiny")  # absolute, not as given
    assert config["trust_remote_code"] is False
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, _, base = ev.load_eval_model(None, str(project / "runs" / "demo" / "adapter"), dtype="float32")
    assert base == str(project / ".models" / "tiny")
    # An older adapter recorded the path as given: found above the adapter, whatever the working folder.
    config["base_model"] = ".models/tiny"
    (project / "runs" / "demo" / "adapter" / "rlora_config.json").write_text(json.dumps(config))
    _, _, base = ev.load_eval_model(None, str(project / "runs" / "demo" / "adapter"), dtype="float32")
    assert Path(base) == project / ".models" / "tiny"
    shutil.move(project / ".models", project / ".models-moved")
    with pytest.raises(UserError, match=r"\.models/tiny is not in the working folder") as e:
        ev.load_eval_model(None, str(project / "runs" / "demo" / "adapter"), dtype="float32")
    assert "--model" in e.value.fix
    # --model names the base; the record is then only compared for the warning.
    ev.load_eval_model(str(project / ".models-moved" / "tiny"), str(project / "runs" / "demo" / "adapter"),
                       dtype="float32", console=quiet())


def test_hub_cache_folder_keeps_its_hub_id(tiny_model_dir, tmp_path):
    import shutil

    from rlora_cli.checkpoint import base_record

    snapshot = tmp_path / "hub" / "models--Org--Tiny-Model" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    assert base_record(str(snapshot)) == {"base_model": str(snapshot), "base_model_hub_id": "Org/Tiny-Model"}
    assert base_record("Org/Not-Local") == {"base_model": "Org/Not-Local", "base_model_hub_id": "Org/Not-Local"}


# ------------------------------------------------------------------------------- custom code


def test_custom_code_adapter_needs_the_flag(tiny_model_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from rlora_cli.adapters import AdapterConfig, inject_adapters
    from rlora_cli.checkpoint import read_adapter_config, save_adapter
    from rlora_cli.model import load_model

    model, tok = load_model(str(tiny_model_dir), dtype="float32")
    # A model class that transformers imported from the repository's own code.
    model.__class__ = type("CustomLlama", (LlamaForCausalLM,), {"__module__": "transformers_modules.org.modeling"})
    inject_adapters(model, AdapterConfig(type="lora", r=2, target_modules=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    assert read_adapter_config(adapter)["trust_remote_code"] is True
    with pytest.raises(UserError, match="runs its own code") as e:
        ev.load_eval_model(None, str(adapter), dtype="float32")
    assert "--trust-remote-code" in e.value.fix
    lm, _, _ = ev.load_eval_model(None, str(adapter), dtype="float32", trust_remote_code=True)
    assert type(lm).__module__.startswith("transformers.")  # the flag only allows; this base has no code


def test_remote_code_refusal_of_an_unmarked_model_names_the_flag():
    from rlora_cli.model import _load_error

    e = _load_error("org/custom", ValueError("The repository org/custom contains custom code which must be "
                                             "executed... pass the argument `trust_remote_code=True`"))
    assert "own code" in e.problem and "--trust-remote-code" in e.fix


# ------------------------------------------------------------------------------- finite adapters


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_adapter_is_refused_naming_file_and_tensor(adapter_dir, tmp_path, bad):
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = adapter_dir
    copy = tmp_path / "adapter"
    shutil.copytree(path, copy)
    tensors = load_file(str(copy / "rlora_adapter.safetensors"))
    name = list(tensors)[3]
    tensors[name][0, 0] = bad
    save_file(tensors, str(copy / "rlora_adapter.safetensors"))
    with pytest.raises(UserError, match=rf"rlora_adapter.safetensors: tensor {name} holds NaN or infinite") as e:
        ev.load_eval_model(None, str(copy), dtype="float32")
    assert "checkpoint" in e.value.fix and "\n" not in e.value.message


def test_eval_output_checks_come_before_any_work(tiny_model_dir, tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "plain").write_text("x")
    with pytest.raises(UserError, match="is a folder"):
        ev.evaluate("mmlu", model=str(tiny_model_dir), output=str(tmp_path / "here"), console=quiet())
    with pytest.raises(UserError, match="plain is a file, not a folder"):
        ev.evaluate("mmlu", model=str(tiny_model_dir), output=str(tmp_path / "plain" / "r.json"), console=quiet())
