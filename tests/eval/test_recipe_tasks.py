"""`rlora eval --task recipe`: every kind of held-out task scored against references (choices by
log-likelihood, free-form by greedy exact match and F1, instruction and chat by loss as training
tokenizes), and a run folder standing for its adapter and recipe."""

from __future__ import annotations

import shutil

import evalkit
import pytest
import torch
import yaml
from conftest import BIGBENCH_FIXTURES
from evalkit import RESULT_KEYS, quiet, reference_generate, reference_loglik, write_jsonl

from rlora_cli.data.pipeline import load_splits, tokenize_example
from rlora_cli.data.templates import choices, gold_index, prompt_and_response, prompt_text
from rlora_cli.eval import run as ev
from rlora_cli.eval.recipe_tasks import exact_match, token_f1
from rlora_cli.recipe.load import load_recipe
from rlora_cli.runs import adapter_dir as find_adapter_dir

BIGBENCH = BIGBENCH_FIXTURES
one_thread = evalkit.one_thread  # a shared fixture


@pytest.fixture(scope="module")
def recipe_path(tiny_model_dir, tmp_path_factory):
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
                  {"name": "claims", "path": str(BIGBENCH / "plausibility" / "task.json"),
                   "format": "bigbench", "val_size": 3},
              ]}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_recipe_eval_reports_every_task_against_references(recipe_path, lm, tmp_path):
    model, tok = lm
    results = ev.evaluate("recipe", recipe=str(recipe_path), dtype="float32", batch_size=4,
                          output=str(tmp_path / "recipe.json"), console=quiet())
    assert set(results) == RESULT_KEYS
    assert results["model"] == str(load_recipe(recipe_path).model.name_or_path)
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
    assert token_f1("The Eiffel tower", "eiffel tower!") == 1.0
    assert token_f1("red blue", "red green") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0 and token_f1("the", "a") == 1.0
    assert exact_match(" Paris \n", ["London", "Paris"]) and not exact_match("paris", ["Paris"])


def test_run_folder_means_its_adapter_and_recipe(adapter_dir, recipe_path, lm):
    path, _ = adapter_dir
    run = path.parent  # a run folder: RUN/adapter and RUN/recipe.yaml
    assert find_adapter_dir(str(run)) == str(path) and find_adapter_dir(str(path)) == str(path)
    shutil.copy(recipe_path, run / "recipe.yaml")
    results = ev.evaluate("recipe", adapter=str(run), dtype="float32", limit=1, console=quiet())
    assert results["adapter"] == str(path) and results["model"] == str(lm[0].name_or_path)
    assert len(results["tasks"]) == 6 and all(t["n"] == 1 for t in results["tasks"].values())
