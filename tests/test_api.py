"""Training from Python (rlora_cli.train): a recipe file, a dict and a Recipe built in code
train the same adapter, silently, and bad input is the CLI's one-line UserError."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import rlora_cli
from rlora_cli import (
    AdapterConfig,
    DataConfig,
    DatasetConfig,
    ModelConfig,
    OutputConfig,
    Recipe,
    TrainConfig,
    UserError,
    load_recipe,
    train,
)
from rlora_cli.cli import main
from rlora_cli.testing import adapter_tensors, metrics, write_recipe

SHORT = {"max_steps": 4, "gradient_accumulation_steps": 1}


def in_code(folder, model_dir) -> Recipe:
    """The recipe write_recipe writes (with SHORT), built section by section in code."""
    return Recipe(
        seed=0,
        model=ModelConfig(name_or_path=str(model_dir), dtype="fp32"),
        adapter=AdapterConfig(type="rlora", r=4, num_heads=2, lora_alpha=8, lora_dropout=0.1, use_rslora=True,
                              target_modules="all-linear"),
        data=DataConfig(max_length=64, datasets=(
            DatasetConfig(name="facts", path=str(folder / "facts.jsonl"), kind="knowledge", val_size=8),
            DatasetConfig(name="reviews", path=str(folder / "reviews.jsonl"), kind="nlu",
                          label_words=("bad", "good"), val_size=8),
        )),
        train=TrainConfig(max_steps=4, micro_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                          warmup_ratio=0.1, precision="fp32"),
        output=OutputConfig(dir="runs/same", save_steps=3, logging_steps=1, save_total_limit=2),
    )


def test_a_file_a_dict_and_a_recipe_in_code_train_the_same_adapter_silently(tmp_path, tiny_model_dir, capfd):
    path = write_recipe(tmp_path, tiny_model_dir, train=SHORT, output={"dir": "runs/same"})
    as_dict = yaml.safe_load(open(path))
    built = in_code(tmp_path, tiny_model_dir)
    assert built == load_recipe(path) == load_recipe(as_dict)  # the three inputs are one recipe
    capfd.readouterr()

    results = {name: train(source, output=tmp_path / name)
               for name, source in (("file", path), ("dict", as_dict), ("code", built))}

    out, err = capfd.readouterr()
    assert out == "" and err == "", out + err  # no console given: nothing printed, no library bars
    reference = adapter_tensors(results["file"].run_dir)
    recipe_yaml = (results["file"].run_dir / "recipe.yaml").read_text()
    for name, result in results.items():
        assert result.run_dir == tmp_path / name and result.adapter_dir == tmp_path / name / "adapter"
        tensors = adapter_tensors(result.run_dir)
        assert tensors.keys() == reference.keys() and reference
        assert all(torch.equal(tensors[k], reference[k]) for k in reference), name
        assert (result.run_dir / "recipe.yaml").read_text() == recipe_yaml, name
        config = json.loads((result.adapter_dir / "rlora_config.json").read_text())
        assert config["recipe"] == (path if name == "file" else "<python>")
        rows = metrics(result.run_dir)  # the file, read here without read_metrics
        last_train = [r for r in rows if "loss" in r][-1]
        last_eval = [r for r in rows if "eval_loss" in r][-1]
        assert result.metrics == {**last_train, "eval_loss": last_eval["eval_loss"]}
        assert result.metrics["step"] == 4 and set(result.metrics["eval_loss"]) == {"facts", "reviews"}
        assert result.metrics["tokens"] > 0 and set(result.metrics["task_loss"]) == {"facts", "reviews"}


def test_overrides_apply_to_a_recipe_in_code_and_are_checked_alike(tmp_path, tiny_model_dir):
    write_recipe(tmp_path, tiny_model_dir)  # the data files
    built = in_code(tmp_path, tiny_model_dir)
    assert load_recipe(built, ["adapter.r=2", "data.datasets.reviews.weight=3"]).adapter.r == 2
    with pytest.raises(UserError, match=r"adapter\.rank: unknown key; rlora calls it `adapter\.r`"):
        load_recipe(built, ["adapter.rank=2"])


def test_a_bad_dict_key_is_the_clis_error(tmp_path, tiny_model_dir, capfd):
    path = write_recipe(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(open(path))
    raw["train"]["lr"] = 1e-3
    with pytest.raises(UserError) as caught:
        train(raw, output=tmp_path / "run")
    assert caught.value.message.startswith("train.lr: unknown key; rlora calls it `train.learning_rate`")
    assert not (tmp_path / "run").exists()

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    capfd.readouterr()
    with pytest.raises(SystemExit) as code:
        main(["train", str(tmp_path / "bad.yaml")])
    assert code.value.code == 2
    assert capfd.readouterr().err.strip() == f"error: {caught.value.message}"


def test_what_is_not_a_recipe_is_a_user_error():
    with pytest.raises(UserError, match="must be a YAML path, a dict or a Recipe, got list"):
        load_recipe([{"model": {}}])


def test_without_output_dir_a_python_recipe_runs_in_runs_method(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, adapter={"type": "multilora"})
    raw = yaml.safe_load(open(path))
    assert load_recipe(path).output.dir == "runs/recipe"  # a file: its name
    assert load_recipe(raw).output.dir == "runs/multilora"


def test_the_public_names_resolve_lazily():
    for name in rlora_cli.__all__:
        assert getattr(rlora_cli, name) is not None, name
    assert rlora_cli.train is train and rlora_cli.Recipe is Recipe


def test_a_dict_mixing_completion_text_and_chat_trains_and_evaluates(tmp_path, tiny_model_dir, capfd):
    """recipes/kinds.yaml as a Python dict (on the tiny model): trains, and `evaluate` scores each
    kind as it should — completion by exact match, F1 and loss; text and chat by loss."""
    from conftest import REPO

    from rlora_cli.eval.run import evaluate

    doc = yaml.safe_load((REPO / "recipes" / "kinds.yaml").read_text())
    doc["model"] = {"name_or_path": str(tiny_model_dir), "dtype": "fp32"}
    doc["data"]["max_length"] = 64
    for source in doc["data"]["datasets"]:
        source["path"] = str(REPO / source["path"])
    doc["train"].update(max_steps=3)
    result = train(doc, output=tmp_path / "run")
    assert result.metrics["step"] == 3 and set(result.metrics["eval_loss"]) == {"units", "logs", "sums"}
    tasks = evaluate("recipe", adapter=str(result.run_dir), dtype="fp32")["tasks"]
    assert {"accuracy", "f1", "loss", "perplexity"} <= set(tasks["units"]) and tasks["units"]["n"] == 10
    assert tasks["logs"]["accuracy"] is None and tasks["logs"]["perplexity"] > 1
    assert tasks["sums"]["loss"] > 0 and tasks["sums"]["n"] == 10
    assert capfd.readouterr().out == ""
