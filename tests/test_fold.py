"""Per-task folding of routed adapters, checked by the real consumers.

A run folder (adapter + resolved recipe.yaml) over a tiny Llama WITH biases, for hydralora and
rlora: the per-task PEFT LoRAs (loaded with `peft`), the merged fold (plain transformers) and
rlora's own layer with its router replaced by the same fixed weights give the same logits; the
mixtures are those of a float64 forward of each example alone; tasks fold differently; where the
rows come from; bad input through the CLI (exit 2, one line); nothing half-written; the vLLM
line; and `rlora eval --compare-routed` against an eval of the merged fold.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import perturb, run_cli  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlora_cli.adapters import AdapterConfig, adapter_layers, inject_adapters
from rlora_cli.checkpoint import load_adapter, save_adapter
from rlora_cli.data.pipeline import load_splits, tokenize_example
from rlora_cli.errors import UserError
from rlora_cli.eval.run import evaluate
from rlora_cli.export import run_recipe
from rlora_cli.fold import export_task, merge_task, plan_folds, vllm_serve
from rlora_cli.recipe.load import load_recipe, recipe_to_dict
from rlora_cli.testing import build_tokenizer, write_recipe

IDS = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
FP32_TOL = 1e-5


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory):
    """The tiny Llama shape with biases on every attention and MLP projection (random, not zero)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attention_bias=True, mlp_bias=True, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("biased") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_run(root: Path, model_dir: Path, adapter: dict, **recipe_sections) -> Path:
    """A run folder as training leaves it (RUN/adapter, RUN/recipe.yaml), without the training:
    random adapters, with routers strong enough that tasks route differently."""
    root.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(root, model_dir, adapter={"r": 4, "num_heads": 3, "lora_dropout": 0.0, **adapter},
                          **recipe_sections)
    resolved = load_recipe(recipe)
    model = load(model_dir)
    inject_adapters(model, resolved.adapter)
    perturb(model, 0.2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if layer.spec.gate == "router":
                layer.rlora_router.mul_(20)
    run = root / "run"
    save_adapter(model, run / "adapter", tokenizer=AutoTokenizer.from_pretrained(model_dir),
                 metadata={"recipe": recipe})
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(resolved)))
    return run


@pytest.fixture(scope="module", params=["hydralora", "rlora"])
def folded(request, biased_model_dir, tmp_path_factory):
    """A routed run, its per-task PEFT export and its merged fold of `facts`."""
    root = tmp_path_factory.mktemp(request.param)
    run = make_run(root, biased_model_dir, {"type": request.param})
    manifest = export_task(run, root / "peft", per_task=True)
    merge_task(run, root / "merged", task="facts")
    return {"method": request.param, "run": run, "root": root, "manifest": manifest}


def fixed_model(run: Path, model_dir: Path, per_module: dict | None):
    """The adapter on its base with every router replaced by the given fixed weights (None: routed)."""
    model = load_adapter(load(model_dir), run / "adapter").eval()
    for name, layer in adapter_layers(model).items():
        layer.fixed_mixture = torch.tensor(per_module[name]) if per_module else None
    return model


# ---------------------------------------------------------------------------- exactness


def test_peft_merged_and_fixed_layer_agree(folded, biased_model_dir):
    from peft import PeftModel

    run, root, manifest = folded["run"], folded["root"], folded["manifest"]
    rank = 8 if folded["method"] == "rlora" else 4  # R-LoRA's compensation adds r to the rank r fold
    assert manifest["rank"] == rank and manifest["vllm_max_lora_rank"] == 8
    routed = logits(fixed_model(run, biased_model_dir, None))
    saved = json.loads((run / "adapter" / "rlora_config.json").read_text())
    scaling = AdapterConfig.from_dict(saved["adapter"]).scaling  # rlora's preset uses rslora
    for task in ("facts", "reviews"):
        entry = manifest["tasks"][task]
        assert entry["folder"] == task and entry["examples"] == 8 and entry["tokens"] > 8 * 5
        assert entry["source"].startswith("the held-out split of")
        config = json.loads((root / "peft" / task / "adapter_config.json").read_text())
        assert config["r"] == rank and config["lora_alpha"] == pytest.approx(scaling * rank)
        ref = logits(fixed_model(run, biased_model_dir, entry["per_module"]))
        assert maxdiff(ref, routed) > 1e-3, "the fold must differ from routing for the test to mean anything"
        peft_model = PeftModel.from_pretrained(load(biased_model_dir), root / "peft" / task).eval()
        diff = maxdiff(logits(peft_model), ref)
        print(f"{folded['method']} {task}: PEFT fold max |Δlogit| = {diff:.2e}")
        assert diff <= FP32_TOL
    merged = load(root / "merged")  # plain transformers
    diff = maxdiff(logits(merged), logits(fixed_model(run, biased_model_dir,
                                                      manifest["tasks"]["facts"]["per_module"])))
    print(f"{folded['method']} facts: merged fold max |Δlogit| = {diff:.2e}")
    assert diff <= FP32_TOL
    assert not [p for p in (root / "merged").iterdir() if p.name.startswith("rlora_")]
    # every folder carries its model card, naming the task it was folded for
    for folder, library in ((root / "merged", "transformers"), (root / "peft" / "reviews", "peft")):
        card = (folder / "README.md").read_text()
        assert f"library_name: {library}" in card and "## Folded for task" in card
    assert "`reviews`" in (root / "peft" / "reviews" / "README.md").read_text()


def manual_mixtures(run: Path, model_dir: Path, task: str) -> dict[str, torch.Tensor]:
    """Per module, the mean of softmax(x·W_rᵀ) in float64 over every token, one example at a time."""
    recipe = load_recipe(run / "recipe.yaml")
    examples = load_splits(recipe)[task][1]
    model = fixed_model(run, model_dir, None)
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    layers = adapter_layers(model)
    inputs, sums, tokens = {}, {}, 0
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n, m in layers.items()]
    for ex in examples:
        ids = tokenize_example(ex, tok, template="default", max_length=recipe.data.max_length).input_ids
        with torch.no_grad():
            model(torch.tensor([ids]))
        tokens += len(ids)
        for name, layer in layers.items():
            w = torch.softmax(inputs[name][0].double() @ layer.rlora_router.double().t(), dim=-1)
            sums[name] = sums.get(name, 0) + w.sum(0)
    for h in hooks:
        h.remove()
    return {name: s / tokens for name, s in sums.items()}


def test_mixtures_are_the_routers_mean_and_tasks_fold_differently(folded, biased_model_dir):
    manifest = folded["manifest"]["tasks"]
    for task in ("facts", "reviews"):
        ref = manual_mixtures(folded["run"], biased_model_dir, task)
        for name, row in manifest[task]["per_module"].items():
            assert row == pytest.approx(ref[name].tolist(), abs=1e-5)  # the routers run in float32
        mixture = manifest[task]["mixture"]
        assert sum(mixture) == pytest.approx(1.0, abs=1e-6)
        assert manifest[task]["entropy"] == pytest.approx(-sum(w * math.log(w) for w in mixture))
    gap = max(abs(a - b) for name in manifest["facts"]["per_module"]
              for a, b in zip(manifest["facts"]["per_module"][name], manifest["reviews"]["per_module"][name]))
    assert gap > 1e-2  # two tasks route differently, so their folds differ


# ---------------------------------------------------------------------------- where the rows come from


def test_rows_come_from_held_out_else_training_else_data(tiny_model_dir, tmp_path):
    run = make_run(tmp_path, tiny_model_dir, {"type": "rlora"},
                   data={"max_length": 64, "datasets": [
                       {"name": "facts", "path": str(tmp_path / "facts.jsonl"), "kind": "knowledge",
                        "val_size": 8},
                       {"name": "reviews", "path": str(tmp_path / "reviews.jsonl"), "kind": "nlu",
                        "label_words": ["bad", "good"], "val_size": 0}]})
    config = json.loads((run / "adapter" / "rlora_config.json").read_text())
    plan = plan_folds(run / "adapter", config, None)
    assert [len(plan.examples[t]) for t in ("facts", "reviews")] == [8, 48]
    assert "held-out split" in plan.sources["facts"] and "training rows" in plan.sources["reviews"]
    # a checkpoint's adapter finds the run's recipe above it; an adapter alone, the one it records
    shutil.copytree(run / "adapter", run / "checkpoint-3" / "adapter")
    assert run_recipe(run / "checkpoint-3" / "adapter", config) == run / "recipe.yaml"
    shutil.copytree(run / "adapter", tmp_path / "elsewhere" / "alone")
    assert run_recipe(tmp_path / "elsewhere" / "alone", config) == Path(config["recipe"])
    with pytest.raises(UserError, match="no recipe.yaml beside the adapter") as e:
        plan_folds(tmp_path / "elsewhere" / "alone", {**config, "recipe": None}, ["facts"])
    assert "--recipe" in e.value.fix
    # the data is gone: the recipe no longer loads, and --data gives one task's rows in its format
    rows = [json.loads(line) for line in (tmp_path / "facts.jsonl").read_text().splitlines()[:5]]
    (tmp_path / "facts.jsonl").unlink()
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="no such file") as e:
        plan_folds(run / "adapter", config, ["facts"])
    assert "--data" in e.value.fix
    plan = plan_folds(run / "adapter", config, ["facts"], data=tmp_path / "mine.jsonl")
    assert len(plan.examples["facts"]) == 5 and "mine.jsonl (--data)" in plan.sources["facts"]
    assert plan.examples["facts"][0].fields["question"] == rows[0]["question"]


# ---------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def rlora_run(tiny_model_dir, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cli"), tiny_model_dir, {"type": "rlora"})


def test_bad_input_exits_2_with_one_line_and_writes_nothing(rlora_run, tmp_path, capsys, no_progress_bars):
    out = tmp_path / "out"
    (tmp_path / "empty.jsonl").write_text(json.dumps({"question": "", "answer": ""}) + "\n")
    cases = {
        "no-task": (["merge", "--adapter", str(rlora_run), "--output", str(out)],
                    ["--task NAME", "facts, reviews", "adapter.router=off"]),
        "no-task-peft": (["export", "--adapter", str(rlora_run), "--format", "peft", "--output", str(out)],
                         ["--task NAME", "--per-task", "facts, reviews"]),
        "unknown-task": (["merge", "--adapter", str(rlora_run), "--task", "nope", "--output", str(out)],
                         ["--task nope", "choose one of: facts, reviews"]),
        "missing-data": (["export", "--adapter", str(rlora_run), "--format", "peft", "--task", "facts",
                          "--data", str(tmp_path / "gone.jsonl"), "--output", str(out)],
                         ["gone.jsonl", "no such"]),
        "no-examples": (["merge", "--adapter", str(rlora_run), "--task", "facts",
                         "--data", str(tmp_path / "empty.jsonl"), "--output", str(out)], ["no usable rows"]),
        "data-per-task": (["export", "--adapter", str(rlora_run), "--format", "peft", "--per-task",
                           "--data", str(tmp_path / "empty.jsonl"), "--output", str(out)], ["one task"]),
        "both": (["export", "--adapter", str(rlora_run), "--format", "peft", "--per-task", "--task", "facts",
                  "--output", str(out)], ["exactly one of --task NAME and --per-task"]),
    }
    for name, (argv, needles) in cases.items():
        assert run_cli(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and " — " in err, (name, err)
        for needle in needles:
            assert needle in err, (name, needle, err)
        assert nothing_written(out), name


def test_a_static_adapter_given_a_task_is_exported_as_it_is(tiny_model_dir, tmp_path, capsys):
    run = make_run(tmp_path, tiny_model_dir, {"type": "rlora", "router": "off"})
    assert run_cli(["export", "--adapter", str(run), "--format", "peft", "--task", "facts",
                 "--output", str(tmp_path / "p")]) == 0
    assert "folding is not needed" in capsys.readouterr().err
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == 8
    assert run_cli(["merge", "--adapter", str(run), "--task", "facts", "--output", str(tmp_path / "m")]) == 0
    assert "folding is not needed" in capsys.readouterr().err and (tmp_path / "m" / "config.json").is_file()


def test_cli_per_task_export_prints_the_vllm_line(rlora_run, tmp_path, capsys):
    out = tmp_path / "peft"
    assert run_cli(["export", "--adapter", str(rlora_run), "--format", "peft", "--per-task",
                 "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"--lora-modules facts={out.absolute()}/facts reviews={out.absolute()}/reviews" in err
    assert "--max-lora-rank 8 --max-loras 2" in err
    assert sorted(p.name for p in out.iterdir()) == ["facts", "reviews", "tasks.json"]


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_interrupted_fold_leaves_nothing(rlora_run, tmp_path, monkeypatch, interrupt):
    from transformers import PreTrainedModel

    import rlora_cli.fold

    real = rlora_cli.fold.write_peft

    def write_one_then_fail(folder, *args):
        real(folder, *args)
        raise interrupt

    monkeypatch.setattr(rlora_cli.fold, "write_peft", write_one_then_fail)
    with pytest.raises(type(interrupt)):
        export_task(rlora_run, tmp_path / "peft", per_task=True)
    assert nothing_written(tmp_path / "peft")

    def half_save(self, directory, **kwargs):
        (Path(directory) / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise interrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_save)
    with pytest.raises(type(interrupt)):
        merge_task(rlora_run, tmp_path / "merged", task="facts")
    assert nothing_written(tmp_path / "merged")


def test_vllm_line_rank_and_refusals(tmp_path):
    folders = {"facts": tmp_path / "a b", "it's": tmp_path / "c"}
    line, why = vllm_serve("org/model", folders, 2)
    assert why is None and line.startswith("vllm serve org/model --enable-lora --lora-modules ")
    assert f"'facts={tmp_path}/a b'" in line and "--max-lora-rank 8 --max-loras 2" in line
    assert [vllm_serve("m", folders, r)[0].split("--max-lora-rank ")[1].split()[0]
            for r in (1, 8, 9, 300, 512)] == ["1", "8", "16", "320", "512"]
    line, why = vllm_serve("m", folders, 513)
    assert line is None and "at most 512" in why
    line, why = vllm_serve("m", folders, 8, head_vocab=300_000)
    assert line is None and "LM head" in why


# ---------------------------------------------------------------------------- eval: routed vs folded


def test_compare_routed_scores_the_fold_that_merge_writes(folded, biased_model_dir, tmp_path):
    run, root = folded["run"], folded["root"]
    results = evaluate("recipe", adapter=str(run), compare_routed=True, output=str(tmp_path / "r.json"),
                       limit=3)  # scored: 3 per task; the folds: every held-out row, as merge's
    rows = results["routed_vs_folded"]["tasks"]
    assert set(rows) == {"facts", "reviews"}
    for task, row in rows.items():
        assert row["routed"] == results["tasks"][task][row["metric"]]
        manifest = folded["manifest"]["tasks"][task]
        assert row["fold"]["mixture"] == pytest.approx(manifest["mixture"], abs=1e-12)
        assert row["delta"] == pytest.approx(row["folded"] - row["routed"])
    assert json.loads((tmp_path / "r.json").read_text())["routed_vs_folded"] == json.loads(json.dumps(
        results["routed_vs_folded"]))
    # `rlora eval --model MERGED --recipe R` scores the merged fold as compare-routed scored it
    merged = evaluate("recipe", model=str(root / "merged"), recipe=str(run / "recipe.yaml"), limit=3)
    facts = rows["facts"]
    assert merged["tasks"]["facts"][facts["metric"]] == facts["folded"]


def test_compare_routed_needs_a_routed_adapter(tiny_model_dir, tmp_path):
    run = make_run(tmp_path, tiny_model_dir, {"type": "hydralora", "router": "off"})
    with pytest.raises(UserError, match="--compare-routed"):
        evaluate("recipe", adapter=str(run), compare_routed=True)
