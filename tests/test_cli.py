"""Every bad input to a command is exit 2 and one line on stderr that names the problem and the fix,
never a traceback: the real `rlora_cli.cli.main` over a matrix of bad command lines (the tiny
offline model; nothing heavier than loading it). Then the CLI's own surface: bracketed names print
literally, flags read as flags in --help, `train --print-config`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rlora_cli.checkpoint import CONFIG_FILE, WEIGHTS_FILE


def run_cli(argv: list[str]) -> int:
    from rlora_cli.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


def edit_config(d: Path, **changes) -> None:
    config = json.loads((d / CONFIG_FILE).read_text())
    config.update(changes)
    (d / CONFIG_FILE).write_text(json.dumps(config))


def poison(d: Path) -> str:
    """Put a NaN into the adapter's second tensor (file order); returns that tensor's name."""
    tensors = load_file(str(d / WEIGHTS_FILE))
    name = list(tensors)[1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(d / WEIGHTS_FILE))
    return name


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """Folders and files the bad command lines point at, by placeholder name."""
    from conftest import perturb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlora_cli.adapters import AdapterConfig, inject_adapters
    from rlora_cli.checkpoint import save_adapter

    root = tmp_path_factory.mktemp("bad")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inject_adapters(model, AdapterConfig(type="lora", r=2, target_modules="all-linear"))
    perturb(model)
    good = save_adapter(model, root / "good" / "adapter",
                        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    paths = {"model": str(tiny_model_dir), "good": str(good), "root": str(root)}
    for name in ("nan", "gone", "gone_rel", "remote"):
        shutil.copytree(good, root / name)
        paths[name] = str(root / name)
    paths["nan_tensor"] = poison(root / "nan")
    edit_config(root / "gone", base_model=str(root / "moved-away"))
    edit_config(root / "gone_rel", base_model=".models/moved-away")  # an older adapter's relative record
    edit_config(root / "remote", trust_remote_code=True)
    (root / "a_file.txt").write_text("keep me\n")
    (root / "a_dir").mkdir()
    paths["file"], paths["dir"] = str(root / "a_file.txt"), str(root / "a_dir")
    results = {"task": "bbh", "model": "m", "adapter": None, "accuracy": 0.5, "n": 2, "mean_accuracy": 0.5,
               "tasks": {"t": {"accuracy": 0.5, "n": 2}}}
    (root / "results.json").write_text(json.dumps(results))
    paths["results"] = str(root / "results.json")
    paths.update(_recipes(root, tiny_model_dir))
    return paths


def _recipes(root: Path, model_dir: Path) -> dict[str, str]:
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("red", "blue", "green", "cat") * 4]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = {"path": str(root / "rows.jsonl"), "kind": "instruction", "val_size": 2}
    base = {"model": {"name_or_path": str(model_dir), "dtype": "fp32"},
            "data": {"max_length": 32, "datasets": [{"name": "say", **dataset}]},
            "train": {"max_steps": 1, "micro_batch_size": 2, "precision": "fp32", "kernels": "none"},
            "output": {"dir": str(root / "run"), "log_with": "none"}}
    recipes = {
        # A module name in brackets, as YAML lists print.
        "recipe_modules": {**base, "adapter": {"type": "lora", "r": 2, "target_modules": ["foo_proj"]}},
        # A dataset name with markup in it, twice.
        "recipe_names": {**base, "adapter": {"type": "lora", "r": 2},
                         "data": {"max_length": 32, "datasets": [{"name": "t[bold]x", **dataset},
                                                                 {"name": "t[bold]x", **dataset}]}},
        "recipe": {**base, "adapter": {"type": "lora", "r": 2}},
    }
    out = {}
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        out[name] = str(root / f"{name}.yaml")
    return out


def _no_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError


# (id, argv with {placeholders} from `world`, words the one line must hold[, setup(monkeypatch)])
CASES = [
    ("train-bracketed-path", ["train", "a[/b].yaml"], ["a[/b].yaml", "no such recipe file"]),
    ("train-markup-path", ["train", "a[bold]x.yaml"], ["a[bold]x.yaml", "no such recipe file"]),
    ("train-flag-with-value", ["train", "{recipe}", "--overwrite", "true"],
     ["--overwrite takes no value", "'true'"]),
    ("train-not-key-value", ["train", "{recipe}", "adapter.r"], ["'adapter.r' is not KEY=VALUE"]),
    ("train-module-name-list", ["train", "{recipe_modules}", "--output", "{root}/run-modules"],
     ["adapter.target_modules: [foo_proj] matches no Linear module", "q_proj"]),
    ("train-dataset-name", ["train", "{recipe_names}", "--dry-run"], ["'t[bold]x' is also data.datasets[0]"]),
    ("eval-negative-shots", ["eval", "--task", "mmlu", "--model", "{model}", "--shots", "-1"],
     ["--shots must be at least 0 (got -1)", "give --shots 0 or more"]),
    ("eval-output-is-a-folder", ["eval", "--task", "mmlu", "--model", "{model}", "--output", "{dir}"],
     ["--output", "a_dir is a folder", "give a file name"]),
    ("eval-lm-eval-missing", ["eval", "--backend", "lm-eval", "--task", "hellaswag", "--model", "{model}"],
     ["pip install 'rlora[eval]'"], _no_lm_eval),
    ("eval-nan-adapter", ["eval", "--task", "recipe", "--recipe", "{recipe}", "--adapter", "{nan}"],
     ["nan/rlora_adapter.safetensors: tensor {nan_tensor} holds NaN or infinite values"]),
    ("eval-not-an-integer", ["eval", "--shots", "abc"], ["Invalid value for '--shots'", "rlora eval --help"]),
    ("eval-compare-plot-is-a-folder", ["eval", "compare", "{results}", "{results}", "--plot", "{dir}"],
     ["--plot", "is a folder"]),
    ("generate-output-is-a-folder", ["generate", "hi", "--model", "{model}", "--output", "{dir}"],
     ["--output", "is a folder"]),
    ("generate-nan-adapter", ["generate", "hi", "--adapter", "{nan}", "--max-new-tokens", "2"],
     ["rlora_adapter.safetensors", "tensor {nan_tensor} holds NaN or infinite values", "earlier checkpoint"]),
    ("generate-base-gone", ["generate", "hi", "--adapter", "{gone}"],
     ["base model", "moved-away no longer exists", "--model"]),
    ("generate-relative-base-gone", ["generate", "hi", "--adapter", "{gone_rel}"],
     [".models/moved-away is not in the working folder nor above the adapter", "--model"]),
    ("generate-remote-code", ["generate", "hi", "--adapter", "{remote}"],
     ["runs its own code", "--trust-remote-code"]),
    ("eval-remote-code", ["eval", "--task", "recipe", "--recipe", "{recipe}", "--adapter", "{remote}"],
     ["runs its own code", "--trust-remote-code"]),
    ("merge-base-gone", ["merge", "--adapter", "{gone}", "--output", "{root}/merged-gone"],
     ["moved-away no longer exists", "--base"]),
    ("merge-remote-code", ["merge", "--adapter", "{remote}", "--output", "{root}/merged-remote"],
     ["runs its own code", "--trust-remote-code"]),
    ("merge-output-is-a-file", ["merge", "--adapter", "{good}", "--output", "{file}"],
     ["--output", "a_file.txt exists and is a file", "choose another --output"]),
    ("init-unknown-method", ["init", "{root}/s.yaml", "--method", "dora"], ["unknown method 'dora'"]),
    ("init-exists", ["init", "{recipe}"], ["exists", "--overwrite"]),
    ("init-not-yaml", ["init", "{file}"], ["a recipe file name ends in .yaml"]),
    ("merge-missing-option", ["merge", "--output", "{root}/x"],
     ["Missing option '--adapter'", "rlora merge --help"]),
    ("export-output-is-a-file",
     ["export", "--adapter", "{good}", "--format", "peft", "--output", "{file}"],
     ["a_file.txt exists and is a file"]),
    ("export-nan-adapter",
     ["export", "--adapter", "{nan}", "--format", "peft", "--output", "{root}/peft-nan"],
     ["tensor {nan_tensor} holds NaN or infinite values"]),
    ("export-remote-code",
     ["export", "--adapter", "{remote}", "--format", "peft", "--output", "{root}/peft-r"],
     ["--trust-remote-code"]),
    ("analyze-output-is-a-file", ["analyze", "{good}", "--output", "{file}"],
     ["--output", "a_file.txt exists and is a file, not a folder"]),
    ("analyze-nan-adapter", ["analyze", "{nan}", "--output", "{root}/analysis-nan"],
     ["holds NaN or infinite values"]),
    ("inspect-missing", ["inspect", "{root}/nowhere[1]"], ["nowhere[1]: no such directory"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_exit_2_and_one_line(world, case, capfd, monkeypatch, no_progress_bars):
    _, argv, words, *setup = case
    for fn in setup:
        fn(monkeypatch)
    code = run_cli([a.format(**world) for a in argv])
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and " — " in lines[0], lines[0]
    for word in words:
        assert word.format(**world) in lines[0], lines[0]
    assert "Traceback" not in out + err


def test_nothing_was_written_by_the_bad_commands(world):
    root = Path(world["root"])
    assert Path(world["file"]).read_text() == "keep me\n" and not any(Path(world["dir"]).iterdir())
    for name in ("merged-gone", "merged-remote", "peft-nan", "peft-r", "analysis-nan", "x"):
        assert not (root / name).exists(), name
    assert not any(p.name.startswith(".") for p in root.iterdir()), "no temporary folder left behind"


def test_matrix_covers_every_command():
    commands = {argv[0] for _, argv, *_ in CASES}
    assert {"train", "eval", "generate", "merge", "export", "analyze", "inspect"} <= commands
    assert len(CASES) >= 14


# ------------------------------------------------------------------------------ CLI surface


def test_flags_read_as_flags_in_help(capsys):
    for command in (["train"], ["merge"], ["export"], ["inspect"], ["generate"], ["analyze"], ["eval"], []):
        assert run_cli([*command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "<bool>" not in out, command
        assert "--help" in out
    run_cli(["train", "--help"])
    out = capsys.readouterr().out
    # valued options keep their type
    assert "--overwrite" in out and "--print-config" in out and "<path>" in out


def test_trust_remote_code_is_a_flag_of_each_loading_command(capsys):
    for command in ("eval", "generate", "merge", "export", "analyze"):
        assert run_cli([command, "--help"]) == 0
        assert "--trust-remote-code" in capsys.readouterr().out, command


def test_print_config_prints_every_key_and_writes_nothing(world, capsys):
    from rlora_cli.recipe.load import load_recipe, recipe_to_dict

    out_dir = Path(world["root"]) / "print-config-run"
    assert run_cli(["train", world["recipe"], "adapter.r=4", "--print-config", "--output", str(out_dir)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = recipe_to_dict(load_recipe(world["recipe"], ("adapter.r=4",)))
    expected["output"]["dir"] = str(out_dir)
    assert printed == expected
    assert printed["adapter"]["r"] == 4 and "lora_dropout" in printed["adapter"]  # a default, filled in
    assert {"seed", "model", "adapter", "data", "train", "output"} <= set(printed)
    assert not out_dir.exists() and not (Path(world["root"]) / "run").exists()


def test_print_config_of_a_bad_recipe_is_the_usual_one_line(world, capfd):
    assert run_cli(["train", world["recipe"], "adapter.rank=4", "--print-config"]) == 2
    err = capfd.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and "adapter.rank" in err


def test_user_error_text_prints_literally(capfd):
    import rlora_cli.cli as cli
    from rlora_cli.cli import main
    from rlora_cli.errors import UserError

    message = "[bold]x[/] and [/b] and target_modules: [foo_proj] — pip install 'rlora[eval]'"

    @cli.app.command("boom-test", hidden=True)
    def boom() -> None:
        raise UserError(message)

    try:
        with pytest.raises(SystemExit) as e:
            main(["boom-test"])
    finally:
        cli.app.registered_commands.pop()
    assert e.value.code == 2
    assert capfd.readouterr().err.strip() == f"error: {message}"
