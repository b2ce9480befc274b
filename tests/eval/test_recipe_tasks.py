"""`rlora eval --task recipe`: every kind of held-out task scored against references (choices by
log-likelihood, free-form and completions by greedy exact match and F1, instruction, chat, text
and completion by loss as training tokenizes), a run folder standing for its adapter and recipe,
a recipe of completion, text and chat sources trained end to end and scored per kind, and the
per-example lists (`correct`, `example_keys`) in the held-out split's order."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import evalkit
import pytest
import torch
import yaml
from conftest import BIGBENCH_FIXTURES
from evalkit import RESULT_KEYS, quiet, reference_generate, reference_loglik, write_jsonl
from transformers import AutoTokenizer

from rlora_cli.data.chat_templates import CHAT_TEMPLATES
from rlora_cli.data.pipeline import encode_pieces, load_splits, tokenize_example
from rlora_cli.data.templates import ChatFormat, choices, gold_index, prompt_and_response, prompt_text
from rlora_cli.eval import run as ev
from rlora_cli.eval.recipe_tasks import (
    COMPLETION_SLACK,
    exact_match,
    prepare_recipe,
    run_recipe,
    token_f1,
    turn_end,
)
from rlora_cli.generate import build_prompt
from rlora_cli.recipe.load import load_recipe
from rlora_cli.runs import adapter_dir as find_adapter_dir
from rlora_cli.testing import write_kinds_data, write_recipe
from rlora_cli.training.loop import train

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
        assert tasks[task]["correct"] == [int(h) for h in hits], task  # per example, in the split's order
    texts = [reference_generate(model, tok, prompt_text(ex, tok)) for ex in val["facts"]]
    answers = [ex.fields["answer"] for ex in val["facts"]]
    assert tasks["facts"]["accuracy"] == sum(t.strip() == a for t, a in zip(texts, answers)) / 3
    assert tasks["facts"]["correct"] == [int(t.strip() == a) for t, a in zip(texts, answers)]
    for task, rec in tasks.items():  # a key per held-out example: its prompt's sha1, 12 hex digits
        keys = [hashlib.sha1(prompt_text(ex, tok).encode()).hexdigest()[:12] for ex in val[task]]
        assert rec["example_keys"] == keys and len(set(keys)) == len(keys) == rec["n"], task
        if rec["accuracy"] is not None:
            assert len(rec["correct"]) == rec["n"] and sum(rec["correct"]) / rec["n"] == rec["accuracy"]
    assert tasks["ops"]["correct"] is None and tasks["chats"]["correct"] is None  # loss only
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


def test_per_example_lists_follow_the_split_order(recipe_path, lm):
    """A task mixing choice and free-form examples lists each example's result at its own place
    (the two scorers run one after the other), as when each kind is scored alone."""
    model, tok = lm
    prepared = prepare_recipe(str(recipe_path), None)
    alone = run_recipe(model, tok, prepared, batch_size=4)
    quiz, facts = prepared["val"]["quiz"], prepared["val"]["facts"]
    order = [("facts", 0), ("quiz", 0), ("quiz", 1), ("facts", 1), ("quiz", 2), ("facts", 2)]
    mixed = {**prepared, "val": {"mixed": [{"quiz": quiz, "facts": facts}[t][i] for t, i in order]},
             "templates": {"mixed": "default"}}
    rec = run_recipe(model, tok, mixed, batch_size=4)["mixed"]
    assert rec["correct"] == [alone[t]["correct"][i] for t, i in order]
    by_scorer = alone["quiz"]["correct"][:3] + alone["facts"]["correct"][:3]  # choices first, then free-form
    assert rec["correct"] != by_scorer  # so the test tells the split's order from the scorers' order
    assert rec["example_keys"] == [alone[t]["example_keys"][i] for t, i in order]
    assert rec["n"] == 6 and rec["accuracy"] == sum(rec["correct"]) / 6


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


# ------------------------------------------------------------------ completion, text, named formats


def greedy_until_eos(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True)


def reference_loss(model, rows) -> tuple[float, int]:
    """Summed NLL over the trained tokens of token rows, by plain forwards, and their count."""
    nll = count = 0
    for e in rows:
        n = sum(1 for x in e.labels[1:] if x != -100)
        with torch.no_grad():
            nll += model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item() * n
        count += n
    return nll, count


def test_completion_and_text_tasks_against_references(lm, tiny_model_dir, tmp_path):
    model, tok = lm
    entries = write_kinds_data(tmp_path, template="alpaca")
    entries[0]["template"] = "llama3"  # completions in a format whose markers this vocabulary lacks
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
                                    "data": {"max_length": 64, "datasets": entries}}))
    tasks = ev.evaluate("recipe", recipe=str(path), dtype="float32", batch_size=4, console=quiet())["tasks"]
    assert {k: (v["kind"], v["n"]) for k, v in tasks.items()} == {
        "colors": ("completion", 4), "prose": ("text", 4), "talk": ("chat", 4)}
    val = {t: v for t, (_, v) in load_splits(load_recipe(path)).items()}
    # completion: greedy until EOS, at most the longest reference (tokens, as trained) + the slack
    refs = [prompt_and_response(ex, tok, "llama3")[1] for ex in val["colors"]]
    assert refs[0].endswith(".<|eot_id|>") and turn_end(tok, "llama3") == "<|eot_id|>"
    budget = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs) + COMPLETION_SLACK
    texts = [greedy_until_eos(model, tok, prompt_text(ex, tok, "llama3"), budget).split("<|eot_id|>")[0]
             for ex in val["colors"]]
    gold = [ex.fields["completion"] for ex in val["colors"]]
    assert tasks["colors"]["accuracy"] == sum(t.strip() == g.strip() for t, g in zip(texts, gold)) / 4
    assert tasks["colors"]["f1"] == pytest.approx(sum(token_f1(t, g) for t, g in zip(texts, gold)) / 4)
    for task, template in (("colors", "llama3"), ("prose", "default"), ("talk", "alpaca")):
        rows = [e for ex in val[task] for e in encode_pieces(ex, tok, template=template, max_length=64)]
        nll, count = reference_loss(model, rows)
        assert tasks[task]["tokens"] == count and tasks[task]["loss"] == pytest.approx(nll / count, rel=1e-5)
        assert tasks[task]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # a text is scored whole, over all its pieces: its tokens, less the first, plus EOS
    assert tasks["prose"]["tokens"] == sum(len(tok(ex.fields["text"])["input_ids"]) for ex in val["prose"])
    assert any(len(encode_pieces(ex, tok, max_length=64)) > 1 for ex in val["prose"])
    assert tasks["prose"]["accuracy"] is None and tasks["talk"]["accuracy"] is None


@pytest.fixture(scope="module")
def kinds_run(learnable_model_dir, tmp_path_factory):
    """A run trained on a recipe of completion, text and chat (llama3 format) sources."""
    folder = tmp_path_factory.mktemp("kinds")
    recipe = write_recipe(folder, learnable_model_dir, data={"max_length": 64, "packing": True,
                                                             "datasets": write_kinds_data(folder, "llama3")})
    return train(recipe, output=folder / "run")


def test_kinds_train_end_to_end_and_eval_scores_each(kinds_run, tmp_path):
    saved = json.loads((kinds_run / "adapter" / "rlora_config.json").read_text())["templates"]
    assert {k: v["template"] for k, v in saved.items()} == {"completion": "default", "text": "default",
                                                           "chat": "llama3"}
    assert saved["chat"]["chat_template"] == CHAT_TEMPLATES["llama3"]  # the text itself, with the adapter
    mixture = json.loads((kinds_run / "mixture.json").read_text())
    assert {s["kind"] for s in mixture["sources"]} == {"completion", "text", "chat"}
    assert all(s["trained_tokens"] > 0 for s in mixture["sources"])
    results = ev.evaluate("recipe", adapter=str(kinds_run), dtype="float32", output=str(tmp_path / "r.json"),
                          console=quiet())
    tasks = results["tasks"]
    assert {k: v["kind"] for k, v in tasks.items()} == {"colors": "completion", "prose": "text",
                                                         "talk": "chat"}
    assert set(tasks["colors"]) >= {"accuracy", "f1", "loss", "perplexity", "tokens"}
    assert 0 <= tasks["colors"]["accuracy"] <= 1 and 0 <= tasks["colors"]["f1"] <= 1
    for task in ("prose", "talk"):
        assert tasks[task]["accuracy"] is None and "f1" not in tasks[task]
        assert math.isfinite(tasks[task]["loss"]) and tasks[task]["perplexity"] == pytest.approx(
            math.exp(tasks[task]["loss"]))
    assert results["n"] == 4  # only the completion task has an accuracy
    # generate and eval rebuild the chat prompt from the saved text, not from today's table
    adapter = kinds_run / "adapter"
    config = json.loads((adapter / "rlora_config.json").read_text())
    edited = CHAT_TEMPLATES["llama3"].replace("<|eot_id|>", "<|end|>")
    config["templates"]["chat"]["chat_template"] = edited
    (adapter / "rlora_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(adapter)
    prompt = build_prompt({"prompt": "Hi", "kind": "chat"}, tok, config["templates"])
    assert prompt == ("<|start_header_id|>user<|end_header_id|>\n\nHi<|end|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    prepared = prepare_recipe(str(kinds_run / "recipe.yaml"), 1, adapter=str(adapter))
    assert prepared["templates"] == {"colors": "default", "prose": "default",
                                     "talk": ChatFormat("llama3", edited)}
