"""The multi-task benchmark harness: smoke mode end to end (one budget, and the learning curves:
breadth first, a killed run continued, budgets that grow, the segments bit-identical to one run),
its plans and recipes, the report rebuilt from committed files, the BIG-bench extraction, and bad
input."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIGBENCH_FIXTURES, REPO  # noqa: E402
from safetensors.torch import load_file

from benchmarks.mtl import curves, plan, report
from benchmarks.mtl.__main__ import main
from benchmarks.mtl.fetch_bigbench import extract, task_path
from benchmarks.mtl.run import run_benchmark
from benchmarks.mtl.stats import paired_bootstrap
from rlora_cli.checkpoint import WEIGHTS_FILE, read_adapter_config
from rlora_cli.errors import UserError
from rlora_cli.eval.recipe_tasks import prepare_recipe
from rlora_cli.eval.run import score_folds
from rlora_cli.fold import plan_folds
from rlora_cli.model import load_with_adapter
from rlora_cli.recipe.load import load_recipe
from rlora_cli.testing import metrics
from rlora_cli.training.loop import train

BIGBENCH = str(BIGBENCH_FIXTURES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on busy shared cores loses a lot to them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_smoke_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "mtl"
    results = run_benchmark(None, plan.Settings(), out, smoke=True, methods_given=False)
    assert list(results["methods"]) == ["lora", "rlora"] and list(results["tasks"]) == ["colors", "sizes"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "results.md").read_text()
    for row in ("| base model (before training) |", "| lora |", "| rlora |", "colors", "sizes", "average"):
        assert row in table
    for name in ("lora", "rlora"):
        r = results["methods"][name]
        assert r["seeds"] == [0] and r["trainable_parameters"] > 0 and r["wall_s"]["mean"] > 0
        seed0_run = results["runs"][["lora", "rlora"].index(name)]
        assert r["trainable_parameters"] == seed0_run["trainable_parameters"]
        acc = r["tasks"]["colors"]["mean"]
        assert 0.0 <= acc <= 1.0 and r["tasks"]["colors"]["std"] is None  # one seed: no std
        run = out / "runs" / f"{name}-seed0"
        assert (run / "adapter" / "rlora_config.json").is_file()
        evals = json.loads((run / "eval.json").read_text())  # rlora eval's results shape
        assert set(evals["tasks"]) == {"colors", "sizes"} and evals["tasks"]["sizes"]["n"] == 4
        assert (out / "analysis" / f"{name}.json").is_file()
    methods = results["methods"]
    assert methods["rlora"]["trainable_parameters"] > methods["lora"]["trainable_parameters"]
    assert json.loads((out / "base" / "seed0.json").read_text())["tasks"]["colors"]["n"] == 4
    for png in ("accuracy.png", "head_similarity.png", "spectra.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert "(folded)" not in table and not any("folded" in run for run in results["runs"])
    # finished runs are kept: a second call trains nothing and gives the same results; --fold adds
    # rlora's per-task folds (lora has no router) to the kept run, as a row of their own
    again = run_benchmark(None, plan.Settings(), out, smoke=True, methods_given=False, fold=True)
    assert [{k: v for k, v in r.items() if k != "folded"} for r in again["runs"]] == results["runs"]
    folded = again["runs"][1]["folded"]
    assert "folded" not in again["runs"][0] and set(folded["tasks"]) == {"colors", "sizes"}
    assert folded["tasks"]["sizes"]["n"] == 4 and 0.0 <= folded["tasks"]["colors"]["accuracy"] <= 1.0
    for task, fold in folded["folds"].items():
        assert fold["source"].startswith("the held-out split of") and sum(fold["mixture"]) == pytest.approx(1)
    run_dir = out / "runs" / "rlora-seed0"
    assert json.loads((run_dir / "result.json").read_text())["folded"] == folded
    assert set(json.loads((run_dir / "folded.json").read_text())["tasks"]) == {"colors", "sizes"}
    row = again["methods"]["rlora (folded)"]
    assert row["tasks"]["colors"]["mean"] == folded["tasks"]["colors"]["accuracy"]
    assert row["trainable_parameters"] == methods["rlora"]["trainable_parameters"]
    assert "| rlora (folded) |" in (out / "results.md").read_text()
    assert list(again["methods"]) == ["lora", "rlora", "rlora (folded)"]


def _json(path: Path):
    return json.loads(path.read_text())


def _stamp(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_learning_curves_smoke_resume_and_collect(tmp_path):
    out = tmp_path / "curves"
    settings = plan.Settings(budgets=(2, 4), warmup_steps=1)
    results = run_benchmark(None, settings, out, smoke=True, methods_given=False)
    assert results["budgets"] == [2, 4] and results["variants"] == ["lora", "rlora"]
    recipe = yaml.safe_load((out / "recipes" / "rlora-seed0.yaml").read_text())
    assert recipe["train"]["lr_scheduler"] == "constant" and recipe["train"]["max_steps"] == 4
    assert recipe["train"]["warmup_steps"] == 1
    # Breadth first: both runs trained and scored at budget 2 before either trained on to 4
    written = sorted(curves.budget_files(out), key=_stamp)
    assert [(p.parent.name, p.name) for p in written] == [
        ("lora-seed0", "budget-2.json"), ("rlora-seed0", "budget-2.json"),
        ("lora-seed0", "budget-4.json"), ("rlora-seed0", "budget-4.json")]
    assert _stamp(written[1]) < _stamp(out / "train" / "lora-seed0" / "checkpoint-4" / "trainer_state.json")
    base = _json(out / "base" / "seed0.json")["tasks"]
    for name in ("lora-seed0", "rlora-seed0"):
        for n in (2, 4):
            record = _json(out / "runs" / name / f"budget-{n}.json")
            assert record["budget"] == n and record["train_loss"]["step"] == n
            assert set(record["eval_loss"]) == {"colors", "sizes"}  # the held-out loss at the segment's end
            made = record["provenance"]
            assert made["gpu"] == "cpu" and made["finished_at"].endswith("+00:00") and made["versions"]
            for task, rec in record["tasks"].items():  # every run scored on the base model's examples
                assert len(rec["correct"]) == rec["n"] == 4 and sum(rec["correct"]) / 4 == rec["accuracy"]
                assert rec["example_keys"] == base[task]["example_keys"]
        assert (out / "train" / name / "checkpoint-2" / "adapter").is_dir()
    folded = _json(out / "runs" / "rlora-seed0" / "budget-4.json")["folded"]
    assert set(folded["folds"]) == {"colors", "sizes"} and "folded" not in _json(
        out / "runs" / "lora-seed0" / "budget-4.json")
    assert [p["tasks"] for p in folded["usage"]["pairwise_l1"]] == [["colors", "sizes"]]
    # the folded scores, routing measured once, are eval.run.score_folds's (which measures it itself)
    recipe_path = out / "recipes" / "rlora-seed0.yaml"
    adapter = out / "train" / "rlora-seed0" / "checkpoint-4" / "adapter"
    lm, tokenizer, _ = load_with_adapter(None, str(adapter), dtype="fp32")
    tasks, infos = score_folds(plan_folds(adapter, read_adapter_config(adapter), None, recipe=recipe_path),
                               prepare_recipe(str(recipe_path), None), lm, tokenizer, 8, None)
    assert [folded["tasks"], folded["folds"]] == json.loads(json.dumps([tasks, infos]))
    records = [_json(f) for f in curves.budget_files(out)]
    for n in ("2", "4"):
        summary = results["by_budget"][n]
        assert [(c["a"], c["b"]) for c in summary["comparisons"]] == [("rlora", "lora"),
                                                                        ("rlora (folded)", "rlora")]
        assert list(summary["methods"]) == ["lora", "rlora", "rlora (folded)"]
        same = [r for r in records if r["budget"] == int(n)]
        itself = paired_bootstrap(curves.side(same, "rlora"), curves.side(same, "rlora"))
        assert itself["ci"] == [0.0, 0.0] and itself["resolved"] is False
        usage = results["router_usage"]["rlora"][n]
        assert 0 <= usage["fold_entropy"] <= usage["uniform_entropy"] + 1e-9 and usage["heads"] == 2
    table = (out / "results.md").read_text()
    for text in ("## 2 steps", "## 4 steps", "| rlora − lora |", "| rlora (folded) − rlora |", "Router usage",
                 "The ordering is the same at every budget"):
        assert text in table
    logged = any("router_entropy" in json.loads(line)
                 for line in (out / "runs" / "rlora-seed0" / "metrics.jsonl").read_text().splitlines())
    assert (out / "plots" / "router_entropy.png").is_file() == logged
    for png in ("curves.png", "accuracy.png", "head_similarity.png", "spectra.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"

    # Killed: rlora after its step-2 checkpoint (no budget 4, no checkpoint 4, no final adapter),
    # lora after training but before budget 4 was scored. The same command again continues both.
    rlora, lora = out / "train" / "rlora-seed0", out / "train" / "lora-seed0"
    kept = {p: p.read_bytes() for p in (out / "runs" / "rlora-seed0" / "budget-2.json",
                                        lora / "metrics.jsonl")}
    before = {name: _json(out / "runs" / f"{name}-seed0" / "budget-4.json") for name in ("lora", "rlora")}
    def step2() -> list[str]:
        return [line for line in (rlora / "metrics.jsonl").read_text().splitlines() if '"step": 2,' in line]

    logged2 = step2()
    ckpt2 = (rlora / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns
    shutil.rmtree(rlora / "checkpoint-4")
    shutil.rmtree(rlora / "adapter")
    for name in ("lora", "rlora"):
        (out / "runs" / f"{name}-seed0" / "budget-4.json").unlink()
    again = run_benchmark(None, settings, out, smoke=True, methods_given=False)
    assert all(p.read_bytes() == data for p, data in kept.items())  # lora not retrained; budget 2 kept
    assert (rlora / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns == ckpt2
    # rlora went on from step 2 (its step-2 log row, throughput and all, is the first run's), and
    # resuming is exact on the CPU: the same loss at step 4 and the same answers
    assert step2() == logged2
    for name in ("lora", "rlora"):
        after = _json(out / "runs" / f"{name}-seed0" / "budget-4.json")
        assert after["train_loss"]["loss"] == pytest.approx(before[name]["train_loss"]["loss"], rel=1e-5)
        assert {t: r["correct"] for t, r in after["tasks"].items()} == {
            t: r["correct"] for t, r in before[name]["tasks"].items()}

    # The committed copy (by_run/, no train/) rebuilds the same report on a machine without a model
    raw = tmp_path / "raw"
    shutil.copytree(out / "runs", raw / "by_run", ignore=shutil.ignore_patterns("train"))
    shutil.copytree(out / "base", raw / "base")
    shutil.copy(out / "settings.json", raw / "settings.json")
    rebuilt, _ = report.rebuild(raw, tmp_path / "rebuilt")
    assert json.loads(json.dumps(rebuilt)) == json.loads(json.dumps(again)) == _json(out / "results.json")
    assert (tmp_path / "rebuilt" / "results.md").read_text() == (out / "results.md").read_text()
    # a shard of a finished benchmark trains nothing and writes no report
    done = run_benchmark(None, settings, out, smoke=True, methods_given=False, shard=(2, 2))
    assert done == {"shard": [2, 2], "runs": ["rlora-seed0"]}


def test_budgets_grow_and_the_segments_are_one_run(tmp_path):
    """Budgets 2,4, then 2,4,6 in the same OUT: 2 and 4 are kept, 6 goes on from checkpoint-4. The
    run trained a segment per budget (0→2→4→6, each resumed from the one before) is bit-identical
    on the CPU to the recipe trained to 6 at once, the 3-step warm-up across a segment's end included."""
    out, name = tmp_path / "grow", "rlora-seed0"

    def run(budgets: tuple[int, ...]) -> dict:
        settings = plan.Settings(methods=("rlora",), budgets=budgets, warmup_steps=3)
        return run_benchmark(None, settings, out, smoke=True, shard=(1, 1))  # a shard: no report

    run((2, 4))
    results, run_dir = out / "runs" / name, out / "train" / name
    kept = {p: p.read_bytes() for p in (results / "budget-2.json", results / "budget-4.json")}
    checkpoints = {n: _stamp(run_dir / f"checkpoint-{n}" / "trainer_state.json") for n in (2, 4)}
    with pytest.raises(UserError, match="holds the budgets 2,4, and --budgets gives 4"):
        run((4,))  # budgets may grow, never shrink
    assert run((2, 4, 6)) == {"shard": [1, 1], "runs": [name]}
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert {n: _stamp(run_dir / f"checkpoint-{n}" / "trainer_state.json") for n in (2, 4)} == checkpoints
    assert _json(results / "budget-6.json")["train_loss"]["step"] == 6
    recipe = yaml.safe_load((out / "recipes" / f"{name}.yaml").read_text())["train"]
    assert (recipe["max_steps"], recipe["warmup_steps"], recipe["lr_scheduler"]) == (6, 3, "constant")
    direct = tmp_path / "direct"
    train(out / "recipes" / f"{name}.yaml", output=direct)  # checkpoints every 2 steps (the smallest budget)
    for n in (2, 4, 6):
        segmented, planned = (load_file(d / f"checkpoint-{n}" / "adapter" / WEIGHTS_FILE)
                              for d in (run_dir, direct))
        assert segmented.keys() == planned.keys()
        assert all(torch.equal(segmented[k], planned[k]) for k in planned), n

    def losses(d: Path) -> dict:
        return {r["step"]: r["loss"] for r in metrics(d) if "loss" in r}

    assert losses(run_dir) == losses(direct) and list(losses(direct)) == [2, 4, 6]

def test_round_one_raw_files_still_report(tmp_path):
    """The committed single-budget folder rebuilds its committed table from its files alone."""
    raw = REPO / "benchmarks" / "raw" / "mtl_fold"
    results, text = report.rebuild(raw, tmp_path)
    committed = _json(raw / "results.json")
    for key in ("methods", "base", "tasks", "runs"):
        assert json.loads(json.dumps(results[key])) == committed[key], key
    assert text == (raw / "results.md").read_text() == (tmp_path / "results.md").read_text()
    assert (tmp_path / "plots" / "accuracy.png").is_file()


def test_recipes_cover_every_variant_and_validate(tmp_path, tiny_model_dir):
    settings = plan.Settings(model=str(tiny_model_dir), r=4, num_heads=3, target_modules="all-linear",
                             val_size=2)
    tasks = plan.find_tasks(BIGBENCH, ("plausibility", "count_items"))
    assert list(tasks) == ["plausibility", "count_items"] and [n for _, n in tasks.values()] == [12, 5]
    assert tasks["count_items"][0] == BIGBENCH_FIXTURES / "count_items" / "task.json"
    assert set(plan.find_tasks(BIGBENCH)) == {"answer_first", "count_items", "plausibility",
                                              "several_correct", "spell_backwards", "table_lookup",
                                              "word_kinds/nouns"}
    r = plan.matched_lora_rank(str(tiny_model_dir), settings)
    counts = plan.trainable_counts(str(tiny_model_dir), settings, tuple(plan.VARIANTS), r)
    # LoRA's count is linear in r, so the matched rank is the closest to rlora's count
    per_rank = counts["lora"] / settings.r
    assert abs(counts["lora-matched"] - counts["rlora"]) <= per_rank / 2
    assert counts["hydralora"] == counts["rlora"] == counts["hydralora-ri"] == counts["hydralora-hd"] \
        == counts["rlora-router-lr"] == counts["rlora-mi"]
    assert counts["rlora-router-off"] < counts["rlora"]  # no router weights
    assert counts["multilora"] > counts["rlora"] > counts["lora"]
    for method in plan.VARIANTS:
        section = plan.recipe(method, 1, settings, tasks, r)
        if method == "rlora-mi":
            assert section["adapter"]["router_aux_weight"] == 0.05 and plan.routed(method)
        path = plan.write_recipe(tmp_path / "recipes" / f"{method}-seed1.yaml", section)
        recipe = load_recipe(path)  # the real validator
        assert recipe.seed == 1 and [d.format for d in recipe.data.datasets] == ["bigbench", "bigbench"]
        assert [d.val_size for d in recipe.data.datasets] == [2, 1]  # val_size 2 of 12; a quarter of 5
        assert recipe.adapter.scaling == pytest.approx(settings.lora_alpha / settings.r)  # same s for all
    ablation = load_recipe(tmp_path / "recipes" / "hydralora-ri-seed1.yaml").adapter
    assert (ablation.type, ablation.random_init, ablation.head_dropout) == ("hydralora", True, False)
    off = load_recipe(tmp_path / "recipes" / "rlora-router-off-seed1.yaml").adapter
    assert (off.router, off.random_init, off.head_dropout) == ("off", True, True)
    assert load_recipe(tmp_path / "recipes" / "lora-matched-seed1.yaml").adapter.r == r
    fast = load_recipe(tmp_path / "recipes" / "rlora-router-lr-seed1.yaml").adapter
    assert (fast.type, fast.router, fast.router_lr_ratio) == ("rlora", "softmax", 10)
    # learning curves: a constant schedule to the largest budget, checkpoints every smallest budget,
    # all kept; log windows that end at every budget
    curve = plan.recipe("rlora", 1, dataclasses.replace(settings, budgets=(150, 300, 600, 1200)), tasks, r)
    assert curve["train"]["max_steps"] == 1200 and curve["train"]["lr_scheduler"] == "constant"
    assert curve["train"]["warmup_steps"] == 18  # fixed, not a ratio of the largest budget
    assert "warmup_steps" not in plan.recipe("rlora", 1, settings, tasks, r)["train"]
    odd = plan.recipe("rlora", 1, dataclasses.replace(settings, budgets=(25, 60, 1000)), tasks, r)["output"]
    assert (odd["save_steps"], odd["logging_steps"]) == (25, 5)
    assert curve["output"] == {"save_steps": 150, "save_total_limit": 0, "logging_steps": 10, "eval_steps": 0}
    assert plan.recipe("rlora", 1, settings, tasks, r)["train"]["lr_scheduler"] == "cosine"


def test_shards_split_the_runs_without_overlap():
    settings = plan.Settings(methods=("lora", "rlora", "hydralora"), seeds=(0, 1))
    every = plan.pairs(settings)
    assert every[:4] == [("lora", 0), ("rlora", 0), ("hydralora", 0), ("lora", 1)] and len(every) == 6
    shards = [plan.pairs(settings, (i, 4)) for i in (1, 2, 3, 4)]
    assert shards[0] == [("lora", 0), ("rlora", 1)] and shards[3] == [("lora", 1)]
    assert sorted(p for s in shards for p in s) == sorted(every)


def _tarball(path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_fetch_bigbench_extracts_only_task_files(tmp_path):
    root = "bigbench-1.0.0/bigbench/benchmark_tasks"
    _tarball(tmp_path / "bigbench-1.0.0.tar.gz", {
        f"{root}/snarks/task.json": b'{"examples": []}',
        f"{root}/anu/4_distractors/task.json": b"{}",
        f"{root}/anu/README.md": b"no",
        f"{root}/program/task.py": b"no",
        "bigbench-1.0.0/setup.py": b"no",
        f"{root}/../../evil/task.json": b"no",
    })
    assert extract(tmp_path, tmp_path / "out") == 2  # the folder pip downloaded to
    found = sorted(p.relative_to(tmp_path / "out").as_posix()
                   for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert found == ["anu/4_distractors/task.json", "snarks/task.json"]
    assert (tmp_path / "out" / "snarks" / "task.json").read_bytes() == b'{"examples": []}'
    assert task_path("x/bigbench/benchmark_tasks/task.json") is None
    empty = _tarball(tmp_path / "e" / "bigbench-1.0.0.tar.gz", {"bigbench-1.0.0/setup.py": b""})
    with pytest.raises(UserError, match="no bigbench/benchmark_tasks"):
        extract(empty, tmp_path / "out2")
    with pytest.raises(UserError, match="no bigbench-"):
        extract(tmp_path / "nowhere", tmp_path / "out3")


def test_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # --smoke sets it; restore it after the test
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no task.json files"):
        plan.find_tasks(tmp_path / "empty")
    with pytest.raises(SystemExit) as e:  # the command line: one red line, exit 2
        main(["--tasks-dir", str(tmp_path / "empty"), "--model", "unused", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "no task.json files" in capsys.readouterr().err
    with pytest.raises(UserError, match="no such folder"):
        plan.find_tasks(tmp_path / "missing")
    (tmp_path / "prog" / "t").mkdir(parents=True)
    (tmp_path / "prog" / "t" / "task.json").write_text('{"subtasks": ["a"]}')
    with pytest.raises(UserError, match="none of its task.json files holds examples"):
        plan.find_tasks(tmp_path / "prog")
    with pytest.raises(UserError, match="no JSON task nope"):
        plan.find_tasks(BIGBENCH, ("nope",))
    with pytest.raises(UserError, match="unknown method"):
        plan.check_methods(("lora", "dora"))
    for bad, message in ((["--seeds", "a,b"], "not a list of integers"),
                         (["--budgets", "100,x"], "not a list of positive step counts"),
                         (["--budgets", "4", "--max-steps", "4"], "both set the number of steps"),
                         (["--budgets", "4", "--warmup-steps", "-1"], "--warmup-steps: must be >= 0"),
                         (["--shard", "3/2"], "is not i/k")):
        with pytest.raises(SystemExit) as e:
            main(["--smoke", *bad, "--out", str(tmp_path / "o")])
        assert e.value.code == 2 and message in capsys.readouterr().err, bad
    with pytest.raises(SystemExit) as e:
        main(["--collect", "--out", str(tmp_path / "empty")])
    assert e.value.code == 2 and "no result files" in capsys.readouterr().err


def test_settings_changes_are_refused_in_a_used_out(tmp_path, monkeypatch):
    """A second run with other settings must not mix with the first one's finished runs."""
    from benchmarks.mtl import run as run_mod

    monkeypatch.setattr(run_mod, "score_base", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        run_benchmark(None, plan.Settings(), tmp_path, smoke=True, methods_given=False)
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved["smoke"] is True and saved["lora_matched_r"] >= 1
    recipe = yaml.safe_load((tmp_path / "recipes" / "rlora-seed0.yaml").read_text())
    assert recipe["adapter"]["type"] == "rlora"
    with pytest.raises(UserError, match="other settings"):
        run_benchmark(None, plan.Settings(lora_dropout=0.3), tmp_path, smoke=True, methods_given=False)
    # A settings.json from before warmup_steps: its curves warmed up for ceil(0.03 × 600) = 18 steps
    before = {k: v for k, v in saved.items() if k != "warmup_steps"} | {"budgets": [150, 300, 600]}
    (tmp_path / "settings.json").write_text(json.dumps(before))
    grown = {**before, "budgets": [150, 300, 600, 1200], "warmup_steps": 18}
    with pytest.raises(UserError, match=r"other settings \(warmup_steps\)"):
        run_mod._claim(tmp_path / "settings.json", {**grown, "warmup_steps": 20})
    run_mod._claim(tmp_path / "settings.json", grown)
    assert json.loads((tmp_path / "settings.json").read_text()) == grown
