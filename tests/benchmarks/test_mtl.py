"""The multi-task benchmark harness: smoke mode end to end, its plans and recipes, the BIG-bench
extraction, and bad input."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import yaml
from conftest import BIGBENCH_FIXTURES  # noqa: E402

from benchmarks.mtl import plan
from benchmarks.mtl.__main__ import main
from benchmarks.mtl.fetch_bigbench import extract, task_path
from benchmarks.mtl.run import run_benchmark
from rlora_cli.errors import UserError
from rlora_cli.recipe.load import load_recipe

BIGBENCH = str(BIGBENCH_FIXTURES)


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
    assert counts["hydralora"] == counts["rlora"] == counts["hydralora-ri"] == counts["hydralora-hd"]
    assert counts["rlora-router-off"] < counts["rlora"]  # no router weights
    assert counts["multilora"] > counts["rlora"] > counts["lora"]
    for method in plan.VARIANTS:
        path = plan.write_recipe(tmp_path / "recipes" / f"{method}-seed1.yaml",
                                 plan.recipe(method, 1, settings, tasks, r))
        recipe = load_recipe(path)  # the real validator
        assert recipe.seed == 1 and [d.format for d in recipe.data.datasets] == ["bigbench", "bigbench"]
        assert [d.val_size for d in recipe.data.datasets] == [2, 1]  # val_size 2 of 12; a quarter of 5
        assert recipe.adapter.scaling == pytest.approx(settings.lora_alpha / settings.r)  # same s for all
    ablation = load_recipe(tmp_path / "recipes" / "hydralora-ri-seed1.yaml").adapter
    assert (ablation.type, ablation.random_init, ablation.head_dropout) == ("hydralora", True, False)
    off = load_recipe(tmp_path / "recipes" / "rlora-router-off-seed1.yaml").adapter
    assert (off.router, off.random_init, off.head_dropout) == ("off", True, True)
    assert load_recipe(tmp_path / "recipes" / "lora-matched-seed1.yaml").adapter.r == r


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
    with pytest.raises(SystemExit) as e:
        main(["--smoke", "--seeds", "a,b", "--out", str(tmp_path / "o")])
    assert e.value.code == 2


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
