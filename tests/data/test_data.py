"""Sources, splits, mixing, tokenization caching, packing and collation on real files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BIGBENCH_FIXTURES, REPO, real_bigbench_task  # noqa: E402

from rlora_cli.data.bigbench import bigbench_prompt
from rlora_cli.data.mixture import draw_indices, plan_counts, target_shares
from rlora_cli.data.packing import pack_batch
from rlora_cli.data.pipeline import collate, load_splits, prepare, split_indices, write_mixture
from rlora_cli.data.templates import choices, gold_index, prompt_and_response
from rlora_cli.errors import UserError
from rlora_cli.recipe.load import load_recipe
from rlora_cli.training.preview import dry_run

BIGBENCH = BIGBENCH_FIXTURES
# fixture task -> the answer its first example trains on
BIGBENCH_FIRST_ANSWERS = {"answer_first": "ampere", "plausibility": "possible", "several_correct": "4",
                          "count_items": "4", "spell_backwards": "pmal", "table_lookup": "plum",
                          "word_kinds/nouns": "noun"}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_for(tmp_path: Path, datasets: list[dict], overrides=(), **data) -> object:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny"},
                                    "data": {"datasets": datasets, **data}}))
    return load_recipe(path, overrides)


@pytest.fixture
def three_sources(tmp_path):
    instr = jsonl(tmp_path / "ops.jsonl",
                  [{"instruction": f"Repeat {i}.", "output": f"{i} {i}"} for i in range(40)])
    nlu = jsonl(tmp_path / "rev.jsonl", [{"sentence": f"review {i}", "label": i % 2} for i in range(40)])
    mc = jsonl(tmp_path / "num.jsonl",
               [{"question": f"Largest of {i}?", "choices": [str(i), str(i + 1)], "answer": 1}
                for i in range(40)])
    return [
        {"path": str(instr), "kind": "instruction", "weight": 5, "val_size": 4},
        {"path": str(nlu), "kind": "nlu", "weight": 3, "columns": {"text": "sentence"},
         "label_words": ["negative", "positive"], "val_size": 4},
        {"path": str(mc), "kind": "knowledge", "weight": 2, "val_size": 4},
    ]


def test_plan_counts_follow_temperature_and_caps():
    assert target_shares([5, 3, 2], 1.0) == pytest.approx([0.5, 0.3, 0.2])
    sqrt = np.sqrt([5, 3, 2])
    assert target_shares([5, 3, 2], 2.0) == pytest.approx(sqrt / sqrt.sum())
    assert plan_counts([10, 10, 10], [5, 3, 2], 1.0, [None] * 3, total=10_000) == [5000, 3000, 2000]
    assert sum(plan_counts([10, 10, 10], [1, 1, 1], 1.0, [None] * 3, total=100)) == 100
    assert plan_counts([10, 10, 10], [5, 3, 2], 1.0, [None, 100, None], total=10_000) == [5000, 100, 2000]
    assert plan_counts([30, 20, 50], [1, 1, 1], 1.0, [None, 5, None]) == [29, 5, 28]  # N = 30 + 5 + 50


def test_draw_is_without_replacement_unless_upsampled():
    rng = np.random.default_rng(0)
    down = draw_indices(100, 60, rng)
    assert len(down) == 60 and len(set(down.tolist())) == 60
    up = Counter(draw_indices(10, 37, rng).tolist())
    assert sum(up.values()) == 37 and set(up) == set(range(10)) and set(up.values()) == {3, 4}


def test_mixture_shares_on_10k_draws_and_determinism(tmp_path, tok, three_sources):
    cache = str(tmp_path / "cache")
    for temperature in (1.0, 2.0):
        recipe = recipe_for(tmp_path, three_sources, num_samples=10_000, temperature=temperature)
        p = prepare(recipe, tok, cache_dir=cache)
        counts = Counter(p.train["task_id"])
        expected = target_shares([5, 3, 2], temperature)
        assert len(p.train) == 10_000
        for task_id, share in enumerate(expected):
            assert abs(counts[task_id] / 10_000 - share) <= 0.02
            assert p.mixture.sources[task_id].share_examples == pytest.approx(share, abs=0.02)
    again = prepare(recipe, tok, cache_dir=cache)
    assert again.train["task_id"] == p.train["task_id"] and again.train["input_ids"] == p.train["input_ids"]
    other = prepare(recipe_for(tmp_path, three_sources, ["seed=1"], num_samples=10_000, temperature=2.0), tok,
                    cache_dir=cache)
    assert other.train["task_id"] != p.train["task_id"]


def test_prepared_contract(tmp_path, tok, three_sources):
    recipe = recipe_for(tmp_path, three_sources, max_length=64)
    p = prepare(recipe, tok, cache_dir=str(tmp_path / "cache"))
    assert p.tasks == ["ops", "rev", "num"]
    assert set(p.train.column_names) == {"input_ids", "labels", "task_id", "n_trained_tokens"}
    assert len(p.train) == 108 == p.mixture.examples  # N = 3 x 36 training rows, shares 5:3:2
    assert [s.used for s in p.mixture.sources] == [54, 32, 22]  # 108 x (.5, .3, .2), largest remainder
    for row in p.train.select(range(20)):
        assert row["n_trained_tokens"] == sum(1 for x in row["labels"] if x != -100) > 0
        assert row["labels"][0] == -100 and len(row["input_ids"]) == len(row["labels"]) <= 64
    assert {k: len(v) for k, v in p.val.items()} == {"ops": 4, "rev": 4, "num": 4}
    assert p.mixture.trained_tokens == sum(p.train["n_trained_tokens"])
    rev = p.val_examples["rev"][0]
    assert rev.task == "rev" and rev.kind == "nlu" and rev.fields["label_words"] == ["negative", "positive"]
    num = p.val_examples["num"][0]
    assert choices(num)[gold_index(num)] == prompt_and_response(num)[1]
    assert set(p.templates) == {"instruction", "nlu", "knowledge"}


def test_splits_are_deterministic_disjoint_and_shared(tmp_path, tok, three_sources):
    train, val = split_indices(100, 0.1, 0, "a")
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100
    assert np.array_equal(val, split_indices(100, 0.1, 0, "a")[1])
    assert not np.array_equal(val, split_indices(100, 0.1, 1, "a")[1])
    assert len(split_indices(100, 7, 0, "a")[1]) == 7 and len(split_indices(3, 0.01, 0, "a")[1]) == 1
    recipe = recipe_for(tmp_path, three_sources)
    splits = load_splits(recipe, recipe.seed, cache_dir=str(tmp_path / "cache"))
    p = prepare(recipe, tok, cache_dir=str(tmp_path / "cache"))
    for task, (train_ex, val_ex) in splits.items():
        assert val_ex == p.val_examples[task] and len(train_ex) == 36
        assert not {json.dumps(e.fields, sort_keys=True) for e in train_ex} & \
            {json.dumps(e.fields, sort_keys=True) for e in val_ex}


def test_cache_follows_recipe_and_tokenizer(tmp_path, tok, three_sources):
    from rlora_cli.testing import build_tokenizer

    cache = str(tmp_path / "cache")
    recipe = recipe_for(tmp_path, three_sources)
    first = prepare(recipe, tok, cache_dir=cache).val["ops"]
    assert first.cache_files  # tokenized rows are cached on disk next to the source's cache
    assert prepare(recipe, tok, cache_dir=cache).val["ops"]._fingerprint == first._fingerprint
    shorter = prepare(recipe_for(tmp_path, three_sources, ["data.max_length=16"]), tok,
                      cache_dir=cache).val["ops"]
    other_tok = build_tokenizer(vocab_size=300)
    retok = prepare(recipe, other_tok, cache_dir=cache).val["ops"]
    assert len({first._fingerprint, shorter._fingerprint, retok._fingerprint}) == 3
    held_out = prepare(recipe, other_tok, cache_dir=cache).val_examples["ops"][0]
    prompt_ids = other_tok(prompt_and_response(held_out)[0], add_special_tokens=False)["input_ids"]
    assert retok["input_ids"][0] == prompt_ids \
        + retok["input_ids"][0][len(retok["input_ids"][0]) - retok["n_trained_tokens"][0]:]


def test_local_formats_and_column_mapping(tmp_path, tok):
    import pandas as pd

    rows = [{"review": f"text {i}", "stars": ["bad", "good"][i % 2]} for i in range(10)]
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "r.parquet")
    (tmp_path / "r.json").write_text(json.dumps(rows))
    folder = tmp_path / "parts"
    folder.mkdir()
    jsonl(folder / "a.jsonl", rows[:5])
    jsonl(folder / "b.jsonl", rows[5:])
    for path in ("r.csv", "r.parquet", "r.json", "parts"):
        entry = {"path": str(tmp_path / path), "kind": "nlu", "columns": {"text": "review", "label": "stars"},
                 "val_size": 0}
        (train, val), = load_splits(recipe_for(tmp_path, [entry]), 0,
                                    cache_dir=str(tmp_path / "cache")).values()
        assert len(train) == 10 and not val
        assert sorted(e.fields["text"] for e in train) == sorted(r["review"] for r in rows)
        assert {e.fields["label"] for e in train} == {"bad", "good"}
        # text labels without label_words: sorted set
        assert train[0].fields["label_words"] == ["bad", "good"]


def test_arc_style_choices_and_sharegpt_chat(tmp_path, tok):
    arc = jsonl(tmp_path / "arc.jsonl", [
        {"q": "Which is a planet?", "choices": {"text": ["Moon", "Mars", "Sun"], "label": ["A", "B", "C"]},
         "key": "B"},
        {"q": "Which is wet?", "choices": {"text": ["water", "sand"], "label": ["1", "2"]}, "key": "1"}])
    chats = jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                               {"from": "gpt", "value": "hello"}]},
                                            {"conversations": [{"from": "human", "value": "no answer"}]}])
    recipe = recipe_for(tmp_path, [
        {"path": str(arc), "kind": "knowledge", "columns": {"question": "q", "answer": "key"}, "val_size": 0},
        {"path": str(chats), "kind": "chat", "columns": {"messages": "conversations"}, "val_size": 0}])
    splits = load_splits(recipe, 0, cache_dir=str(tmp_path / "cache"))
    arc_rows = splits["arc"][0]
    assert [e.fields["answer_index"] for e in arc_rows] == [1, 0]
    assert prompt_and_response(arc_rows[0])[1] == " B. Mars"
    chat_rows = splits["chat"][0]  # the row without an assistant turn is dropped
    assert [e.fields["messages"] for e in chat_rows] == [[{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello"}]]
    p = prepare(recipe, tok, cache_dir=str(tmp_path / "cache"))
    assert p.mixture.sources[1].dropped == 1 and p.mixture.sources[1].rows == 1


def check_bigbench_rows(rows: list, raw: dict) -> None:
    """Each row is BIG-bench's prompt for its example (file order), answered as BIG-bench scores it."""
    assert len(rows) == len(raw["examples"]) and all(e.kind == "knowledge" for e in rows)
    for row, ex in zip(rows, raw["examples"]):
        q = row.fields["question"]
        assert q == bigbench_prompt(raw, ex, [])  # the evaluator's own prompt: train and eval see one text
        head = raw.get("task_prefix", "") + raw.get("example_input_prefix", "\nQ: ")
        assert q.startswith(head + ex["input"])
        assert q.endswith(raw.get("example_output_prefix", "\nA: "))
        prompt, response = prompt_and_response(row)
        assert prompt + response == q + row.fields["answer"]
        if "target_scores" in ex:  # multiple choice wins over a target (table_lookup has both)
            scores = ex["target_scores"]
            best = max(scores, key=scores.get)  # the first of equally scored choices, in file order
            assert row.fields["choices"] == list(scores) and row.fields["answer"] == best
            assert choices(row)[gold_index(row)] == response
            appended = raw.get("append_choices_to_input", True)
            assert (raw.get("choice_prefix", "\n  choice: ") + best in q) == appended
        else:
            targets = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
            assert row.fields["answer"] == targets[0] and row.fields["targets"] == targets
            assert choices(row) is None and gold_index(row) is None


def test_bigbench_fixtures_cover_every_shape():
    """The fixture tasks hold every shape the BIG-bench readers handle (the tests below rely on it)."""
    tasks = {t: json.loads((BIGBENCH / t / "task.json").read_text()) for t in BIGBENCH_FIRST_ANSWERS}
    assert {p.parent.relative_to(BIGBENCH).as_posix() for p in BIGBENCH.rglob("task.json")} == set(tasks)
    examples = [ex for t in tasks.values() for ex in t["examples"]]
    scored = [ex["target_scores"] for ex in examples if "target_scores" in ex]
    assert any(sum(v == max(s.values()) for v in s.values()) > 1 for s in scored)  # several right answers
    assert any(0 < v < 1 for s in scored for v in s.values())  # a partial score
    assert any(isinstance(ex.get("target"), list) and "target_scores" not in ex for ex in examples)
    assert any(isinstance(ex.get("target"), str) and "target_scores" not in ex for ex in examples)
    assert any("target" in ex and "target_scores" in ex for ex in examples)
    first = tasks["answer_first"]["examples"]  # the right answer listed first, in every example
    assert all(list(s)[0] == max(s, key=s.get) for s in (ex["target_scores"] for ex in first))
    keys = {"task_prefix", "example_input_prefix", "example_output_prefix", "choice_prefix",
            "few_shot_example_separator", "append_choices_to_input"}
    assert keys <= {k for t in tasks.values() for k in t}
    assert any(t.get("append_choices_to_input") is False for t in tasks.values())
    assert any("target_scores" in ex and t.get("append_choices_to_input", True)
               for t in tasks.values() for ex in t["examples"])


@pytest.mark.parametrize("task", list(BIGBENCH_FIRST_ANSWERS))
def test_bigbench_source(tmp_path, tok, task):
    raw = json.loads((BIGBENCH / task / "task.json").read_text())
    recipe = recipe_for(tmp_path, [{"path": str(BIGBENCH / task), "format": "bigbench", "val_size": 0}])
    (rows, _), = load_splits(recipe, 0).values()
    assert all(e.task == Path(task).name for e in rows)  # a subtask is named by its own folder
    check_bigbench_rows(rows, raw)
    assert rows[0].fields["answer"] == BIGBENCH_FIRST_ANSWERS[task]
    assert prepare(recipe, tok).mixture.sources[0].rows == len(raw["examples"])


def test_real_bigbench_tasks_read_like_the_fixtures(tmp_path):
    """Real task files (their prefixes, choices and targets) become the same rows as the fixtures."""
    for task in ("date_understanding", "implicatures", "misconceptions", "object_counting", "physics",
                 "penguins_in_a_table", "presuppositions_as_nli", "snarks", "sports_understanding"):
        path = real_bigbench_task(task)
        recipe = recipe_for(tmp_path, [{"path": str(path.parent), "format": "bigbench", "val_size": 0}])
        (rows, _), = load_splits(recipe, 0).values()
        check_bigbench_rows(rows, json.loads(path.read_text()))


def test_hub_source_offline_is_one_clear_line(tmp_path, tok):
    recipe = recipe_for(tmp_path, [{"path": "nyu-mll/glue", "subset": "sst2", "kind": "nlu",
                                    "columns": {"text": "sentence"},
                                    "label_words": ["negative", "positive"]}])
    with pytest.raises(UserError) as info:
        prepare(recipe, tok, cache_dir=str(tmp_path / "cache"))
    assert info.value.problem.startswith("data.datasets[0] (sst2): cannot load nyu-mll/glue (sst2) split "
                                         "train from the Hugging Face hub")
    assert "\n" not in info.value.message


def test_zero_usable_rows(tmp_path, tok):
    empty = jsonl(tmp_path / "e.jsonl",
                  [{"instruction": "Do it.", "output": ""}, {"instruction": " ", "output": "x"}])
    with pytest.raises(UserError, match=r"data.datasets\[0\] \(e\): no usable rows in .* \(2 rows"):
        prepare(recipe_for(tmp_path, [{"path": str(empty), "kind": "instruction"}]), tok,
                cache_dir=str(tmp_path / "c"))


def test_label_outside_label_words_after_the_first_rows(tmp_path, tok):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(8)] + [{"text": "odd", "label": 5}]
    recipe = recipe_for(tmp_path, [{"path": str(jsonl(tmp_path / "l.jsonl", rows)), "kind": "nlu",
                                    "label_words": ["negative", "positive"]}])
    with pytest.raises(UserError, match=r"row 8: label 5 is outside label_words \['negative', 'positive'\]"):
        prepare(recipe, tok, cache_dir=str(tmp_path / "cache"))


def test_val_size_that_leaves_nothing(tmp_path, tok):
    path = jsonl(tmp_path / "s.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(UserError, match="leaves none of the 3 usable rows"):
        prepare(recipe_for(tmp_path, [{"path": str(path), "kind": "knowledge", "val_size": 3}]), tok,
                cache_dir=str(tmp_path / "cache"))


def test_pack_keeps_labels_aligned():
    examples = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]],
                "labels": [[-100, 2, 3], [4, 5], [-100, -100, 8, 9], [10]],
                "task_id": [0, 1, 2, 0], "n_trained_tokens": [2, 2, 2, 1]}
    # Best fit decreasing: [4 tokens] opens a row, [3] does not fit beside it and opens another,
    # [2] fills the first row exactly, [1] joins the second.
    rows = pack_batch(examples, max_length=6)
    assert rows["input_ids"] == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 10]]
    assert rows["labels"] == [[-100, -100, 8, 9, -100, 5], [-100, 2, 3, -100]]  # no target across a boundary
    assert rows["position_ids"] == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0]]
    assert rows["task_ids"] == [[2, 2, 2, 2, 1, 1], [0, 0, 0, 0]]
    assert rows["n_examples"] == [2, 2] and rows["n_trained_tokens"] == [4, 3]
    batch = collate([{k: v[i] for k, v in rows.items()} for i in range(2)] + [
        {"input_ids": [11, 12], "labels": [-100, 12], "task_id": 1, "n_trained_tokens": 1}],
        pad_id=0, packing=True)
    assert "attention_mask" not in batch
    assert batch["position_ids"][2].tolist() == [0, 1, 0, 1, 2, 3]  # padding is a sequence of its own
    assert batch["labels"][2].tolist() == [-100, 12, -100, -100, -100, -100]
    assert batch["task_ids"][2].tolist() == [1, 1, -1, -1, -1, -1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(tmp_path, tok, tiny_model_dir, three_sources, attn):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn,
                                                 dtype=torch.float32).eval()
    recipe = recipe_for(tmp_path, three_sources, ["data.packing=true"], max_length=128)
    p = prepare(recipe, tok, cache_dir=str(tmp_path / "cache"))
    rows = [r for r in p.train.select(range(8)) if r["n_examples"] > 1][:3]
    assert rows and "position_ids" in p.train.column_names
    batch = collate(rows, pad_id=tok.pad_token_id, packing=True)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        for b, row in enumerate(rows):
            starts = [i for i, pos in enumerate(row["position_ids"]) if pos == 0] + [len(row["input_ids"])]
            for s, e in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row["input_ids"][s:e]])).logits[0]
                assert (packed[b, s:e] - alone).abs().max().item() <= 1e-5
        unpacked = [r for r in prepare(recipe_for(tmp_path, three_sources), tok,
                                       cache_dir=str(tmp_path / "cache")).train.select(range(4))]
        padded = collate(unpacked, pad_id=tok.pad_token_id, packing=False)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        for b, row in enumerate(unpacked):
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            assert (logits[b, :n] - alone).abs().max().item() <= 1e-5
            tasks = padded["task_ids"][b]
            assert tasks[:n].eq(row["task_id"]).all() and tasks[n:].eq(-1).all()


def test_write_mixture_and_dry_run(tmp_path, tok, tiny_model_dir, three_sources, monkeypatch):
    import datasets
    from rich.console import Console

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    recipe = recipe_for(tmp_path, three_sources)
    p = prepare(recipe, tok, cache_dir=str(tmp_path / "cache"))
    write_mixture(p.mixture, tmp_path / "run" / "mixture.json")
    saved = json.loads((tmp_path / "run" / "mixture.json").read_text())
    assert saved["examples"] == 108 and [s["name"] for s in saved["sources"]] == ["ops", "rev", "num"]
    assert sum(s["share_tokens"] for s in saved["sources"]) == pytest.approx(1.0)
    # no temporary left behind
    assert not [f for f in (tmp_path / "run").iterdir() if f.name != "mixture.json"]
    path = tmp_path / "dry.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)},
                                    "data": {"datasets": three_sources}}))
    console = Console(record=True, width=120)
    dry_run(path, ["data.max_length=64"], console)
    out = console.export_text()
    for text in ("Mixture: 108 examples", "ops (instruction)", "rev (nlu)", "num (knowledge)", "dry run ok",
                 "Text: review", "trained"):
        assert text in out, text
    assert re.search(r"Answer: (negative|positive)<\|endoftext\|>", out)


def test_readable_hub_source_uses_classlabel_names_and_checks_columns(tmp_path, tok, monkeypatch):
    import datasets

    fake = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(6)], "label": [0, 1, 1, 0, 1, 0], "idx": list(range(6))},
        features=datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                    "label": datasets.ClassLabel(names=["negative", "positive"])}))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or fake)
    entry = {"path": "nyu-mll/glue", "subset": "sst2", "kind": "nlu", "columns": {"text": "sentence"},
             "val_size": 0}
    (train, _), = load_splits(recipe_for(tmp_path, [entry]), 0).values()
    assert calls[0][0] == ("nyu-mll/glue", "sst2") and calls[0][1]["split"] == "train"
    assert [e.fields["label"] for e in train] == ["negative", "positive", "positive", "negative", "positive",
                                                  "negative"]
    entry["columns"] = {"text": "premise"}
    with pytest.raises(UserError, match="reads column 'premise'.* its columns are sentence, label, idx"):
        load_splits(recipe_for(tmp_path, [entry]), 0)


def test_committed_demo_data_is_what_the_script_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.write(tmp_path, rows=400, seed=0)
    assert [p.name for p in written] == ["textops.jsonl", "reviews.jsonl", "quiz.jsonl"]
    for path in written:
        assert path.read_bytes() == (REPO / "data" / "demo" / path.name).read_bytes(), path.name
    quiz = [json.loads(line) for line in (tmp_path / "quiz.jsonl").read_text().splitlines()]
    assert all(len(set(q["choices"])) == 4 and 0 <= q["answer"] < 4 for q in quiz)
    assert {q["answer"] for q in quiz} == {0, 1, 2, 3}
    reviews = [json.loads(line)["label"] for line in (tmp_path / "reviews.jsonl").read_text().splitlines()]
    assert 0.4 < sum(reviews) / len(reviews) < 0.6  # balanced labels
