"""Recipe loading: defaults, presets, overrides, every kind of bad input, and the shipped files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import BIGBENCH_FIXTURES, REPO

from rlora_cli.adapters import AdapterConfig
from rlora_cli.config import Recipe
from rlora_cli.errors import UserError
from rlora_cli.recipe.load import configs_dir, load_recipe, recipe_diff, recipe_to_dict, resume_conflicts

WITHIN_INT32 = "integers in a recipe must be within ±2147483647 (2**31-1)"


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"sentence": f"text {i}", "label": i % 2} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write(tmp_path: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def minimal(data_file: Path, **dataset) -> dict:
    entry = {"path": str(data_file), "kind": "nlu", "columns": {"text": "sentence"},
             "label_words": ["negative", "positive"], **dataset}
    return {"model": {"name_or_path": "some/model"}, "data": {"datasets": [entry]}}


def problems_of(tmp_path: Path, recipe: dict | str, overrides=()) -> list[str]:
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, recipe), overrides)
    return info.value.problems


def test_defaults(tmp_path, data_file):
    r = load_recipe(write(tmp_path, minimal(data_file), "my_run.yaml"))
    preset = yaml.safe_load((REPO / "configs/adapters/rlora.yaml").read_text())
    assert r.seed == 0
    assert (r.model.dtype, r.model.trust_remote_code, r.model.attn_implementation) == ("auto", False, "sdpa")
    assert r.adapter == AdapterConfig(**preset)
    assert r.adapter.use_rslora is True and r.adapter.r == 8 and r.adapter.num_heads == 3
    d = r.data.datasets[0]
    assert (d.name, d.kind, d.weight, d.val_size, d.template, d.max_samples) == \
        ("reviews", "nlu", 1.0, 0.05, "default", None)
    assert d.label_words == ("negative", "positive")
    assert (r.data.max_length, r.data.packing, r.data.train_on_prompt, r.data.temperature) == \
        (512, False, False, 1.0)
    t = r.train
    assert (t.num_epochs, t.max_steps, t.micro_batch_size, t.gradient_accumulation_steps) == (1, -1, 8, 1)
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.precision, t.kernels) == \
        (2e-4, "cosine", 0.03, "auto", "auto")
    assert (t.weight_decay, t.max_grad_norm, t.compile, t.gradient_checkpointing) == (0.0, 1.0, False, False)
    o = r.output
    assert (o.dir, o.save_steps, o.save_total_limit, o.logging_steps, o.eval_steps, o.log_with) == \
        ("runs/my_run", 500, 3, 10, 0, "none")


def test_every_field_has_a_docstring():
    import ast
    import inspect

    from rlora_cli import config

    tree = ast.parse(inspect.getsource(config))
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    for cls in (c for c in classes if c.name.endswith(("Config", "Recipe"))):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                doc = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                assert documented, f"{cls.name}.{node.target.id}"


def test_preset_then_recipe_keys(tmp_path, data_file):
    recipe = minimal(data_file) | {"adapter": {"type": "hydralora", "r": 16}}
    a = load_recipe(write(tmp_path, recipe)).adapter
    assert (a.type, a.r, a.num_heads, a.lora_dropout, a.router, a.random_init) == \
        ("hydralora", 16, 4, 0.05, "softmax", False)


def test_overrides_are_yaml_values(tmp_path, data_file):
    path = write(tmp_path, minimal(data_file))
    r = load_recipe(path, ["train.learning_rate=1e-4", "adapter.target_modules=[q_proj,v_proj]",
                           "data.datasets[0].weight=2", "data.datasets.reviews.val_size=3", "seed=7",
                           "adapter.router=off", "data.packing=true"])
    assert r.train.learning_rate == pytest.approx(1e-4) and isinstance(r.train.learning_rate, float)
    assert r.adapter.target_modules == ("q_proj", "v_proj") and r.adapter.router == "off"
    assert r.data.datasets[0].weight == 2.0 and r.data.datasets[0].val_size == 3
    assert isinstance(r.data.datasets[0].val_size, int)
    assert r.seed == 7 and r.data.packing is True


def test_yaml_quirks_are_read_as_meant(tmp_path, data_file):
    text = yaml.safe_dump(minimal(data_file)) + "train:\n  learning_rate: 1e-4\nadapter:\n  router: off\n"
    r = load_recipe(write(tmp_path, text))
    assert r.train.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert r.adapter.router == "off"  # and an unquoted off as false


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: x\n data: [\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert f"{path}:3:" in info.value.problem and "not valid YAML" in info.value.problem


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_recipe(tmp_path, text):
    with pytest.raises(UserError, match="the recipe is empty"):
        load_recipe(write(tmp_path, text))


def test_missing_recipe_and_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_wrong_types(tmp_path, data_file):
    recipe = minimal(data_file) | {"train": {"micro_batch_size": "eight", "compile": "yes please"},
                                   "seed": 1.5}
    problems = problems_of(tmp_path, recipe)
    assert "train.micro_batch_size: must be an integer, got 'eight'" in problems
    assert "train.compile: must be true or false, got 'yes please'" in problems
    assert "seed: must be an integer, got 1.5" in problems
    assert len(problems) == 3


def test_unquoted_yes_no_label_words_and_the_rest_of_the_entry(tmp_path, data_file):
    problems = problems_of(tmp_path, minimal(data_file, label_words=[False, True], weight=-1))
    assert problems[0].startswith("data.datasets[0].label_words: must be a list of strings")
    assert "quote them" in problems[0]
    # a bad type does not hide the rest
    assert problems[1:] == ["data.datasets[0].weight: must be > 0, got -1"]


@pytest.mark.parametrize("where,key,expected", [
    ("", "cutoff_len", "`cutoff_len` is LLaMA-Factory's name; rlora calls it `data.max_length`"),
    ("", "sequence_len", "axolotl's name; rlora calls it `data.max_length`"),
    ("", "lora_rank", "rlora calls it `adapter.r`"),
    ("adapter", "lora_r", "rlora calls it `adapter.r`"),
    ("", "lora_target", "rlora calls it `adapter.target_modules`"),
    ("train", "per_device_train_batch_size", "rlora calls it `train.micro_batch_size`"),
    ("", "num_train_epochs", "rlora calls it `train.num_epochs`"),
    ("", "learning_rate", "it belongs in `train.learning_rate`"),
    ("", "gradient_accumulation_steps", "it belongs in `train.gradient_accumulation_steps`"),
    ("", "micro_batch_size", "it belongs in `train.micro_batch_size`"),
    ("train", "lerning_rate", "did you mean `train.learning_rate`?"),
    ("output", "output_dir", "rlora calls it `output.dir`"),
])
def test_unknown_keys_name_the_right_key(tmp_path, data_file, where, key, expected):
    recipe = minimal(data_file)
    (recipe.setdefault(where, {}) if where else recipe)[key] = 1
    problems = problems_of(tmp_path, recipe)
    path = f"{where}.{key}" if where else key
    assert len(problems) == 1 and problems[0].startswith(f"{path}: ") and expected in problems[0], problems


def test_unknown_key_in_a_dataset_entry(tmp_path, data_file):
    recipe = minimal(data_file)
    recipe["data"]["datasets"][0]["type"] = "alpaca"
    problems = problems_of(tmp_path, recipe)
    assert problems == ["data.datasets[0].type: `type` is axolotl's name; "
                        "rlora calls it `data.datasets[0].kind`"]


def test_missing_file(tmp_path, data_file):
    problems = problems_of(tmp_path, minimal(tmp_path / "nope" / "reviews.jsonl"))
    assert len(problems) == 1 and problems[0].startswith("data.datasets[0].path: no such file or folder")


def test_missing_column_names_the_existing_ones(tmp_path, data_file):
    problems = problems_of(tmp_path, minimal(data_file, columns={"text": "review"}))
    assert problems == ["data.datasets[0].columns.text: no column 'review' in reviews.jsonl; "
                        "its columns are sentence, label"]
    problems = problems_of(tmp_path, minimal(data_file, columns={}))
    assert len(problems) == 1
    assert "nlu needs a 'text' column" in problems[0] and "sentence, label" in problems[0]


@pytest.mark.parametrize("weight", [-1, 0])
def test_weight_must_be_positive(tmp_path, data_file, weight):
    assert problems_of(tmp_path, minimal(data_file, weight=weight)) == \
        [f"data.datasets[0].weight: must be > 0, got {weight}"]


def test_unknown_kind_and_template(tmp_path, data_file):
    problems = problems_of(tmp_path, minimal(data_file, kind="summary"))
    assert problems == ["data.datasets[0].kind: unknown value 'summary'; "
                        "choose one of instruction, nlu, knowledge, chat, completion, text"]
    problems = problems_of(tmp_path, minimal(data_file, template="vicuna"))
    assert problems == ["data.datasets[0].template: unknown value 'vicuna'; "
                        "choose one of default, chat, llama3, qwen, mistral, gemma, alpaca"]


def test_nlu_labels(tmp_path, data_file):
    problems = problems_of(tmp_path, minimal(data_file, label_words=None))
    assert len(problems) == 1 and "labels in reviews.jsonl are integers" in problems[0]
    bad = tmp_path / "three.jsonl"
    bad.write_text("".join(json.dumps({"text": "t", "label": i}) + "\n" for i in range(3)))
    problems = problems_of(tmp_path, minimal(bad, columns={}))
    assert len(problems) == 1 and "label 2 in three.jsonl is outside label_words" in problems[0]


def test_max_length_and_ranges(tmp_path, data_file):
    recipe = minimal(data_file, val_size=1.5, max_samples=0) | {
        "train": {"warmup_ratio": 1.0, "precision": "bf32", "compile_mode": "fast"}}
    recipe["data"] |= {"max_length": 4, "temperature": 0}
    problems = problems_of(tmp_path, recipe)
    assert "data.max_length: must be >= 8, got 4" in problems
    assert "data.temperature: must be > 0, got 0" in problems
    assert any(p.startswith("data.datasets[0].val_size: a fraction must be in [0, 1)") for p in problems)
    assert "data.datasets[0].max_samples: must be >= 1 (or null for no cap), got 0" in problems
    assert "train.warmup_ratio: must be in [0, 1), got 1" in problems
    assert "train.precision: unknown value 'bf32'; choose one of auto, bf16, fp16, fp32" in problems
    assert ("train.compile_mode: unknown value 'fast'; choose one of default, reduce-overhead, "
            "max-autotune-no-cudagraphs") in problems
    assert len(problems) == 7


def test_warmup_steps_must_not_be_negative(tmp_path, data_file):
    problems = problems_of(tmp_path, minimal(data_file) | {"train": {"warmup_steps": -5}})
    assert problems == ["train.warmup_steps: must be >= 0 (0 = use warmup_ratio), got -5"]
    fixed = minimal(data_file) | {"train": {"warmup_steps": 18}}
    assert load_recipe(write(tmp_path, fixed)).train.warmup_steps == 18


def test_numbers_no_run_can_use_are_all_reported_in_every_section(tmp_path, data_file):
    nan, inf = float("nan"), float("inf")
    recipe = minimal(data_file, weight=nan, val_size=inf) | {
        "seed": 2**32, "adapter": {"r": 2**31, "lora_alpha": inf, "lora_dropout": nan},
        "train": {"learning_rate": nan, "max_grad_norm": -inf, "micro_batch_size": 10**30},
        "output": {"save_minutes": inf, "eval_steps": -(10**20)}}
    recipe["data"] |= {"temperature": inf, "max_length": 2**40}
    problems = problems_of(tmp_path, recipe)
    assert sorted(problems) == sorted([
        "seed: 4294967296 is out of range; give an integer from 0 to 4294967295",
        "adapter.r: 2147483648 is too large; integers in a recipe must be within ±2147483647 (2**31-1)",
        "adapter.lora_alpha: must be a finite number, got inf",
        "adapter.lora_dropout: must be a finite number, got nan",
        "data.datasets[0].weight: must be a finite number, got nan",
        "data.datasets[0].val_size: must be a finite number, got inf",
        "data.temperature: must be a finite number, got inf",
        "data.max_length: 1099511627776 is too large; " + WITHIN_INT32,
        "train.learning_rate: must be a finite number, got nan",
        "train.max_grad_norm: must be a finite number or .inf, got -inf",
        f"train.micro_batch_size: {10**30} is too large; " + WITHIN_INT32,
        "output.save_minutes: must be a finite number, got inf",
        f"output.eval_steps: {-(10**20)} is too small; " + WITHIN_INT32,
    ])


def test_the_edges_of_the_number_ranges_are_accepted(tmp_path, data_file):
    recipe = minimal(data_file) | {"seed": 2**32 - 1, "adapter": {"r": 65536, "num_heads": 256},
                                   "train": {"max_grad_norm": float("inf"), "max_steps": 2**31 - 1}}
    r = load_recipe(write(tmp_path, recipe))
    assert (r.seed, r.adapter.r, r.adapter.num_heads, r.train.max_steps) == (2**32 - 1, 65536, 256, 2**31 - 1)
    assert r.train.max_grad_norm == float("inf")  # no clipping, the norm still logged
    assert load_recipe(write(tmp_path, recipe),
                       ["train.max_grad_norm=0", "seed=0"]).train.max_grad_norm == 0.0
    assert problems_of(tmp_path, recipe, ["adapter.r=65537", "adapter.num_heads=257"]) == [
        "adapter.r: 65537 is larger than any model needs; give at most 65536",
        "adapter.num_heads: 257 is larger than any model needs; give at most 256"]


def test_cuda_graphs_need_packed_compiled_runs(tmp_path, data_file):
    recipe = minimal(data_file) | {"train": {"compile_mode": "reduce-overhead", "compile": True}}
    problems = problems_of(tmp_path, recipe)
    assert problems == ["train.compile_mode: reduce-overhead needs data.packing: true (packed rows are "
                        "padded to max_length: fixed shapes, which CUDA graphs replay); "
                        "use compile_mode: default for unpacked data"]
    liger = minimal(data_file) | {"train": {"compile_mode": "reduce-overhead", "compile": True,
                                            "kernels": "liger"}}
    liger["data"]["packing"] = True
    assert [p.split(" puts ")[0] for p in problems_of(tmp_path, liger)] == ["train.kernels: liger"]
    off = minimal(data_file) | {"train": {"compile_mode": "reduce-overhead"}}  # moot without compile
    assert load_recipe(write(tmp_path, off)).train.compile is False
    recipe = minimal(data_file) | {"train": {"compile_mode": "reduce-overhead", "compile": True}}
    recipe["data"]["packing"] = True
    assert load_recipe(write(tmp_path, recipe)).train.compile_mode == "reduce-overhead"


def test_all_problems_in_one_error_adapter_included(tmp_path, data_file):
    recipe = minimal(data_file, weight=-1) | {"adapter": {"type": "lora", "r": -2, "num_heads": 3},
                                              "cutoff_len": 512, "output": {"log_with": "neptune"}}
    problems = problems_of(tmp_path, recipe)
    assert any(p.startswith("adapter.r: must be a positive integer") for p in problems)
    assert any(p.startswith("adapter.num_heads: lora has one head") for p in problems)
    assert "data.datasets[0].weight: must be > 0, got -1" in problems
    assert any(p.startswith("cutoff_len:") for p in problems)
    assert any(p.startswith("output.log_with: unknown value 'neptune'") for p in problems)
    assert len(problems) == 5


def test_missing_sections_and_bad_overrides(tmp_path, data_file):
    assert problems_of(tmp_path, {"seed": 1}) == ["model: missing; give model: {name_or_path: ...}",
                                                  "data: missing; give data: {datasets: [...]}"]
    problems = problems_of(tmp_path, minimal(data_file), ["train.learning_rate", "data.datasets[4].weight=1"])
    assert problems[0].startswith("override 'train.learning_rate': write KEY=VALUE")
    assert problems[1].startswith("override 'data.datasets[4].weight=1': data.datasets has no item '4'")


def test_duplicate_names(tmp_path, data_file):
    recipe = minimal(data_file)
    recipe["data"]["datasets"] *= 2
    assert problems_of(tmp_path, recipe) == [
        "data.datasets[1].name: 'reviews' is also data.datasets[0]'s name; "
        "task names must be unique (set name:)"]


def test_hub_source_is_checked_by_schema_only(tmp_path):
    recipe = {"model": {"name_or_path": "Qwen/Qwen2.5-0.5B"},
              "data": {"datasets": [{"path": "nyu-mll/glue", "subset": "sst2", "kind": "nlu",
                                     "columns": {"text": "sentence"}, "label_words": ["negative",
                                                                                      "positive"]}]}}
    r = load_recipe(write(tmp_path, recipe))
    assert r.data.datasets[0].name == "sst2"
    recipe["data"]["datasets"][0]["columns"] = {"sentence": "text"}
    assert problems_of(tmp_path, recipe) == [
        "data.datasets[0].columns.sentence: nlu has no field 'sentence'; "
        "its fields are text, label, text_pair"]


def test_bigbench_source(tmp_path):
    task = str(BIGBENCH_FIXTURES / "answer_first" / "task.json")
    recipe = {"model": {"name_or_path": "m"}, "data": {"datasets": [{"path": task, "format": "bigbench"}]}}
    d = load_recipe(write(tmp_path, recipe)).data.datasets[0]
    assert (d.name, d.kind, d.format) == ("answer_first", "knowledge", "bigbench")
    folder = {"model": {"name_or_path": "m"}, "data": {"datasets": [  # a (sub)task folder names the task too
        {"path": str(BIGBENCH_FIXTURES / "word_kinds" / "nouns"), "format": "bigbench"}]}}
    assert load_recipe(write(tmp_path, folder, "folder.yaml")).data.datasets[0].name == "nouns"
    recipe["data"]["datasets"][0] |= {"kind": "nlu", "path": str(tmp_path / "task.json")}
    problems = problems_of(tmp_path, recipe)
    assert problems == ["data.datasets[0].kind: BIG-bench tasks become knowledge rows; "
                        "remove kind or set it to knowledge"]


def test_round_trip_and_diff(tmp_path, data_file):
    r = load_recipe(write(tmp_path, minimal(data_file)), ["adapter.type=multilora"])
    resolved = recipe_to_dict(r)
    again = load_recipe(write(tmp_path, yaml.safe_dump(resolved), "resolved.yaml"))
    assert isinstance(again, Recipe) and again == r
    other = load_recipe(write(tmp_path, yaml.safe_dump(resolved), "resolved.yaml"),
                        ["train.max_steps=10", "output.dir=elsewhere", "data.datasets[0].weight=3",
                         "adapter.r=4"])
    changed = recipe_diff(resolved, recipe_to_dict(other))
    assert changed == ["adapter.r", "data.datasets[0].weight", "output.dir", "train.max_steps"]
    assert resume_conflicts(resolved, recipe_to_dict(other)) == ["adapter.r", "data.datasets[0].weight"]
    assert recipe_diff(resolved, resolved) == []


def test_a_field_added_since_a_run_was_written_is_not_a_change(tmp_path, data_file):
    """A run written before model.quantization or adapter.gate_lr_ratio existed resumes; a source
    only one side lists, or a changed value, still conflicts."""
    new = recipe_to_dict(load_recipe(write(tmp_path, minimal(data_file))))
    old = yaml.safe_load(yaml.safe_dump(new))
    del old["model"]["quantization"], old["adapter"]["gate_lr_ratio"]
    assert resume_conflicts(old, new) == []
    new["data"]["datasets"].append(dict(new["data"]["datasets"][0], name="more"))
    old["seed"] = 1
    conflicts = resume_conflicts(old, new)
    assert conflicts[-1] == "seed" and conflicts[:-1]
    assert all(k.startswith("data.datasets[1].") for k in conflicts[:-1])


def test_shipped_recipes_validate(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name files relative to the repository root
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert {p.name for p in recipes} >= {"demo.yaml", "mixed.yaml"}
    for path in recipes:
        assert path.read_text().startswith("# rlora train "), f"{path.name} must open with its command"
        recipe = load_recipe(path)
        assert recipe.data.datasets, path


def test_every_file_in_configs_validates(tmp_path, data_file):
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted(p for p in (REPO / "configs").rglob("*") if p.is_file())
    assert files
    for path in files:
        kind = path.relative_to(REPO / "configs").parts[0]
        assert kind in ("adapters", "accelerate") and path.suffix == ".yaml", f"no validation for {path}"
        if kind == "adapters":
            assert AdapterConfig(**yaml.safe_load(path.read_text())).type == path.stem
        else:
            assert load_config_from_file(str(path)).num_processes >= 1


def test_shipped_adapter_presets_validate(tmp_path, data_file):
    presets = sorted(Path(configs_dir()).joinpath("adapters").glob("*.yaml"))
    assert {p.stem for p in presets} == {"lora", "multilora", "hydralora", "rlora"}
    for path in presets:
        values = yaml.safe_load(path.read_text())
        recipe = minimal(data_file) | {"adapter": {"type": path.stem}}
        assert load_recipe(write(tmp_path, recipe)).adapter == AdapterConfig(**values), path.name
