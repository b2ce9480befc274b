"""The model card (README.md) of every adapter folder: written by training inside the adapter's
atomic write, its numbers checked against the run's own files (metrics.jsonl, run_info.json's
live parameter count), user text kept safe in YAML and Markdown, and shown by `rlora inspect`.
One tiny training run is shared by the module."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from rlora_cli.card import model_card
from rlora_cli.checkpoint import CARD_FILE, CONFIG_FILE, save_adapter
from rlora_cli.cli import main
from rlora_cli.eval.results import results_dict
from rlora_cli.runs import adapter_info, inspect_dir, read_metrics
from rlora_cli.testing import write_recipe
from rlora_cli.training.loop import train


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 6-step rlora run (checkpoints at steps 3 and 6, held-out loss at the end)."""
    root = tmp_path_factory.mktemp("card")
    return train(write_recipe(root, tiny_model_dir), output=root / "run")


def split(text: str) -> tuple[dict, str]:
    """(front matter, body) of a card, the front matter parsed as Hugging Face parses it."""
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def table_rows(body: str) -> list[list[str]]:
    """Every Markdown table row, split on the unescaped pipes."""
    return [re.split(r"(?<!\\)\|", line)[1:-1] for line in body.splitlines() if line.startswith("|")]


def section_table(body: str, heading: str) -> dict[str, list[str]]:
    """The table under `## heading`: first cell -> the other cells, stripped."""
    section = body.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in table_rows(section)}


def last_losses(run: Path, step: int) -> tuple[dict, dict]:
    """The last logged per-task train loss and held-out loss up to `step`, from metrics.jsonl."""
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["step"] <= step]
    train_loss = [r for r in rows if "task_loss" in r][-1]
    held = [r for r in rows if "eval_loss" in r]
    return train_loss, (held[-1] if held else {})


# ---------------------------------------------------------------- what training writes


@pytest.mark.parametrize("where,step", [("adapter", 6), ("checkpoint-3/adapter", 3),
                                        ("checkpoint-6/adapter", 6)])
def test_training_writes_the_card_with_the_runs_numbers(run, tiny_model_dir, where, step):
    adapter = run / where
    text = (adapter / CARD_FILE).read_text()
    front, body = split(text)
    assert front["base_model"] == str(tiny_model_dir) and front["library_name"] == "rlora"
    assert front["tags"][:2] == ["rlora", "lora"] and "datasets" not in front  # the sources are local files
    info = adapter_info(adapter)
    for name in info["module_names"]:
        assert f"`{name}`" in body
    live = json.loads((run / "run_info.json").read_text())["trainable_parameters"]  # counted on the model
    assert f"| trainable parameters | {live:,} " in body and info["trainable_params"] == live
    assert f"Steps: {step}" + (" of 6;" if step < 6 else ";") in body
    logged, held = last_losses(run, step)
    assert f"trained (label) tokens: {logged['tokens']:,}" in body  # logging_steps 1: the state's count
    rows = section_table(body, "Training")
    for task, loss in logged["task_loss"].items():
        assert rows[f"`{task}`"][0] == f"{loss:.4f}"
        if held:
            assert rows[f"`{task}`"][1] == f"{held['eval_loss'][task]:.4f}"
    assert rows["all"][0] == f"{logged['loss']:.4f}"
    assert ("held-out loss (step 6)" in body) is (step == 6)
    sources = section_table(body, "Training data")
    for source in ("facts", "reviews"):  # weight, examples per epoch, held out (mixture.json's)
        assert sources[f"`{source}`"][2:5] == ["1", "40", "8"]
    assert "rlora generate --adapter" in body
    # Rebuilt later from the folder alone (trainer_state.json for the counters), the card is the same.
    assert model_card(adapter) == text


def test_card_is_written_inside_the_adapters_atomic_write(adapter_dir, tmp_path):
    _, model = adapter_dir

    def broken_card(folder: Path) -> str:
        assert (folder / CONFIG_FILE).is_file()  # the card reads the folder being written
        raise RuntimeError("card failed")

    with pytest.raises(RuntimeError, match="card failed"):
        save_adapter(model, tmp_path / "out", card=broken_card)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
    save_adapter(model, tmp_path / "out", card=lambda folder: model_card(folder))
    assert split((tmp_path / "out" / CARD_FILE).read_text())[0]["library_name"] == "rlora"


# ---------------------------------------------------------------- model_card itself


def test_a_lone_adapter_folder_gets_a_card(adapter_dir, tiny_model_dir):
    folder, _ = adapter_dir
    front, body = split(model_card(folder))
    assert front == {"base_model": str(tiny_model_dir), "library_name": "rlora", "tags": ["lora", "rlora"],
                     "pipeline_tag": "text-generation"}
    info = adapter_info(folder)
    assert f"| trainable parameters | {info['trainable_params']:,} |" in body
    assert "## Adapter" in body and "## How to use" in body
    for missing in ("## Training", "## Evaluation", "## Folded"):
        assert missing not in body


BASE = "/opt/models/a: b #c\n---\nkey: 1"  # a local base path that is YAML and Markdown syntax


@pytest.fixture
def odd_run(adapter_dir, tmp_path) -> Path:
    """A run folder with user text that could break YAML or a Markdown table, a hub-id-looking
    source beside a local file and a BIG-bench task, metrics and two results files."""
    folder, _ = adapter_dir
    run = tmp_path / "run"
    shutil.copytree(folder, run / "adapter")
    config = json.loads((run / "adapter" / CONFIG_FILE).read_text())
    config.update(base_model=BASE, base_model_hub_id=None)
    (run / "adapter" / CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / "rows.jsonl").write_text("{}\n")
    sources = [{"name": "a|b: #x", "path": "someorg/some-data", "kind": "nlu", "weight": 2.0},
               {"name": "local\n---\nkey: 1", "path": str(tmp_path / "rows.jsonl"), "kind": "chat"},
               {"name": "bb", "path": "org/task", "format": "bigbench"}]
    (run / "recipe.yaml").write_text(yaml.safe_dump({"data": {"datasets": sources}}))
    losses = {"a|b: #x": 1.25, "local\n---\nkey: 1": 1.75}
    rows = [{"step": 2, "loss": 1.5, "tokens": 90, "task_loss": losses}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mine = results_dict("mmlu", "base", str(run / "adapter"), 5, None, 1.0,
                        {"math": {"accuracy": 0.625, "n": 8}})
    other = results_dict("mmlu", "base", str(tmp_path / "other"), 5, None, 1.0,
                         {"math": {"accuracy": 0.125, "n": 8}})
    (run / "mmlu.json").write_text(json.dumps(mine))
    (run / "other.json").write_text(json.dumps(other))
    return run


def test_user_text_stays_safe_and_only_hub_ids_are_datasets(odd_run):
    front, body = split(model_card(odd_run / "adapter"))
    assert front["base_model"] == BASE and front["datasets"] == ["someorg/some-data"]
    assert "`/opt/models/a: b #c --- key: 1`" in body
    tables = [t for t in body.split("\n\n") if t.startswith("|")]
    for table in tables:  # every row of a table has the header's number of cells
        widths = {len(r) for r in table_rows(table)}
        assert len(widths) == 1, table
    assert "`a\\|b: #x`" in body and "| `a\\|b: #x` | 1.2500 |" in body
    assert "| `local --- key: 1` | 1.7500 |" in body
    assert "## Evaluation" in body and "| `mmlu.json` |" in body and "0.6250" in body
    assert "other.json" not in body  # results of another adapter are not this one's


def test_damaged_run_files_are_left_out(odd_run):
    (odd_run / "recipe.yaml").write_text("data: [unclosed\n")
    (odd_run / "mixture.json").write_text("{not json")
    (odd_run / "metrics.jsonl").write_bytes(b"\xff\xfe not utf-8\n")
    (odd_run / "mmlu.json").write_text("[1, 2]")
    (odd_run / "checkpoint-4").mkdir()  # no trainer_state.json
    front, body = split(model_card(odd_run / "adapter"))
    assert front["library_name"] == "rlora" and "datasets" not in front
    assert "## Adapter" in body and "## How to use" in body
    for missing in ("## Training", "## Evaluation"):
        assert missing not in body


def test_fold_and_export_variants(odd_run):
    fold = {"task": "a|b: #x", "source": "held-out split", "examples": 8, "tokens": 120,
            "mixture": [0.75, 0.25], "entropy": 0.5623}
    front, body = split(model_card(odd_run / "adapter", library="peft", fold=fold))
    assert front["library_name"] == "peft" and "PeftModel.from_pretrained(base, " in body
    assert f"base = AutoModelForCausalLM.from_pretrained({BASE!r})" in body
    assert "## Folded for task `a|b: #x`" in body and "8 examples (120 tokens)" in body
    assert "| head 0 | 0.7500 |" in body and "| head 1 | 0.2500 |" in body and "0.5623" in body
    front, body = split(model_card(odd_run / "adapter", merged=True))
    assert front["library_name"] == "transformers" and "AutoModelForCausalLM.from_pretrained(" in body
    assert "PeftModel" not in body and "## Folded" not in body


# ---------------------------------------------------------------- rlora inspect


def test_inspect_shows_the_card(run, capsys):
    info = inspect_dir(run)
    assert all(c["adapter"] for c in info["checkpoints"])  # checkpoint-N/adapter, as training writes it
    card = info["adapter"]["card"]
    assert card["front_matter"]["library_name"] == "rlora" and card["body"].startswith("# R-LoRA adapter")
    main(["inspect", str(run), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["adapter"]["card"]["front_matter"]["tags"][:2] == ["rlora", "lora"]
    main(["inspect", str(run / "checkpoint-3" / "adapter")])
    out = capsys.readouterr().out
    for needle in ("model card", "library_name", "R-LoRA adapter", "Steps: 3 of 6", "How to use"):
        assert needle in out
