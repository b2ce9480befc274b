"""The multi-GPU scaling harness on the CPU: its plans (one global batch), its launch commands and
the accelerate configs they name, the resume cut, the loss and adapter gaps, the table, bad
arguments; and (slow) its --smoke run end to end with two gloo processes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from benchmarks import multi_gpu as mg


@pytest.mark.parametrize("gpus,names,accumulations", [
    (2, ["1gpu", "ddp2", "fsdp2"], [2, 1, 1]),
    (3, ["1gpu", "ddp2", "fsdp2"], [2, 1, 1]),
    (8, ["1gpu", "ddp2", "fsdp2", "ddp4", "fsdp4"], [4, 2, 2, 1, 1]),
])
def test_every_run_trains_on_the_same_global_batch(gpus, names, accumulations):
    plans = mg.plans(gpus, accumulation=1)
    assert [p.name for p in plans] == names and [p.accumulation for p in plans] == accumulations
    assert {p.accumulation * p.world for p in plans} == {max(accumulations)}  # × micro-batch: one batch
    assert [p.name for p in mg.plans(4, 3, fsdp=False)] == ["1gpu", "ddp2", "ddp4"]
    assert [p.accumulation for p in mg.plans(4, 3, fsdp=False)] == [12, 6, 3]  # the recipe's own, × N_max / N


def test_one_gpu_is_not_a_scaling_run():
    with pytest.raises(mg.BenchmarkError, match="at least 2"):
        mg.plans(1, 1)


def test_launch_commands_use_the_shipped_accelerate_configs():
    single, ddp, fsdp = mg.plans(2, 1)
    assert mg.command(single)[1:] == ["-m", "benchmarks.multi_gpu", "--worker"]  # no launcher
    for plan, kind in ((ddp, "MULTI_GPU"), (fsdp, "FSDP")):
        cmd = mg.command(plan)
        config = Path(cmd[cmd.index("--config_file") + 1])
        assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-3:] == mg.command(single)[1:]
        assert cmd[cmd.index("--num_processes") + 1] == "2"
        assert 0 < int(cmd[cmd.index("--main_process_port") + 1]) < 65536
        settings = yaml.safe_load(config.read_text())
        assert settings["distributed_type"] == kind and config.parent.name == "accelerate"
    assert yaml.safe_load(mg.ACCELERATE["fsdp"].read_text())["fsdp_config"]["fsdp_version"] == 2


def recipe(max_steps: int, logging_steps: int) -> SimpleNamespace:
    return SimpleNamespace(train=SimpleNamespace(max_steps=max_steps),
                           output=SimpleNamespace(logging_steps=logging_steps))


@pytest.mark.parametrize("max_steps,every,mid", [(30, 5, 15), (20, 1, 10), (4, 1, 2), (12, 5, 5)])
def test_the_resume_check_restarts_at_a_logged_step_before_the_middle(max_steps, every, mid):
    assert mg.resume_step(recipe(max_steps, every)) == mid


def test_too_few_steps_for_the_resume_check_is_one_clear_error():
    with pytest.raises(mg.BenchmarkError, match="raise --max-steps"):
        mg.resume_step(recipe(8, 5))


def test_cut_back_leaves_what_a_run_killed_after_its_checkpoint_leaves(tmp_path):
    run = tmp_path / "ddp2"
    for name in ("checkpoint-5/state/optimizer.bin", "checkpoint-10/state/optimizer.bin", "checkpoint-15/x",
                 "adapter/rlora_adapter.safetensors", "plots/loss.png", "metrics.jsonl", "recipe.yaml",
                 "memory-rank0.json", "memory-rank1.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    copy = mg.cut_back(run, tmp_path / "ddp2-resumed", 10)
    assert sorted(p.name for p in copy.iterdir()) == ["checkpoint-10", "checkpoint-5", "metrics.jsonl",
                                                      "recipe.yaml"]
    assert (copy / "checkpoint-10/state/optimizer.bin").read_text() == "checkpoint-10/state/optimizer.bin"
    assert (run / "adapter").is_dir() and (run / "checkpoint-15").is_dir()  # the original is untouched


def test_loss_gap_against_the_one_gpu_run():
    rows = lambda losses: [{"step": s, "loss": v} for s, v in losses.items()]  # noqa: E731
    base = rows({5: 2.0, 10: 1.0, 15: 0.5})
    gap = mg.loss_gap(base, rows({5: 2.0, 10: 1.01, 15: 0.505}))
    assert gap["steps"] == [5, 10, 15] and gap["ok"]
    assert gap["max_abs"] == pytest.approx(0.01) and gap["max_rel"] == pytest.approx(0.01)
    assert not mg.loss_gap(base, rows({5: 2.0, 10: 1.05, 15: 0.5}))["ok"]  # 5% > LOSS_RTOL
    after = mg.loss_gap(base, rows({5: 9.0, 10: 1.0, 15: 0.5}), after=5)  # before the resume: not compared
    assert after == {"steps": [10, 15], "max_abs": 0.0, "max_rel": 0.0, "ok": True}
    assert not mg.loss_gap(base, rows({5: 2.0, 10: 1.0}))["ok"]  # a step missing


def test_adapter_gap_finds_a_sharded_save(tmp_path):
    def adapter(name: str, tensors: dict) -> Path:
        (tmp_path / name / "adapter").mkdir(parents=True)
        save_file(tensors, str(tmp_path / name / "adapter" / "rlora_adapter.safetensors"))
        return tmp_path / name

    b16 = torch.bfloat16
    a = adapter("a", {"x.rlora_A": torch.zeros(4, 8), "x.rlora_B": torch.ones(8, 4, dtype=b16)})
    b = adapter("b", {"x.rlora_A": torch.full((4, 8), 0.25), "x.rlora_B": torch.ones(8, 4, dtype=b16)})
    half = adapter("half", {"x.rlora_A": torch.zeros(2, 8), "x.rlora_B": torch.ones(4, 4, dtype=b16)})
    assert mg.adapter_gap(a, b) == {"tensors": 2, "same_shapes": True, "max_abs": 0.25}
    assert mg.adapter_gap(a, half) == {"tensors": 2, "same_shapes": False, "max_abs": None}


def test_table_shows_each_run_a_failed_one_and_the_losses_step_by_step():
    ok = {"world": 2, "accumulation": 1, "input_tokens_per_s": 3000.0, "tokens_per_s_per_gpu": 1500.0,
          "scaling_efficiency": 0.75, "step_ms": 12.5, "mfu_per_gpu": 0.4, "peak_memory_gib": 10.0,
          "losses": [[5, 2.0], [10, 1.0]],
          "vs_1gpu": {"loss": {"max_rel": 0.05, "ok": False}, "adapter": {"max_abs": 1e-3}},
          "resume": {"loss": {"max_rel": 0.0, "ok": True}, "adapter": {"max_abs": 0.0}}}
    one = {**ok, "world": 1, "accumulation": 2, "tokens_per_s_per_gpu": 2000.0, "input_tokens_per_s": 2000.0,
           "losses": [[5, 2.0], [10, 1.001]], "vs_1gpu": {}, "resume": {}, "scaling_efficiency": None}
    failed = {"world": 2, "accumulation": 1, "error": "CalledProcessError: 1"}
    report = {"micro_batch": 8, "runs": {"1gpu": one, "ddp2": ok, "fsdp2": failed}}
    lines = mg.table(report).splitlines()
    width = len(mg.COLUMNS) + 1  # cells between |
    assert all(line.count("|") == width for line in lines[:5])
    assert lines[3].startswith("| ddp2 | 2 | 8 × 1 × 2 | 3,000 | 1,500 | 75% | 12.5 | 40.0% | 10.00 "
                               "| 5.00e-02 ✗ | 1.00e-03 |")  # ✗: over LOSS_RTOL
    assert lines[3].endswith("| 0.00e+00 | 0.00e+00 |") and "n/a" in lines[2]
    assert lines[4].startswith("| fsdp2 | 2 | 8 × 1 × 2 | failed: CalledProcessError: 1 |")
    assert lines[6:] == ["| step | 1gpu | ddp2 |", "|---:|---:|---:|", "| 5 | 2.0000 | 2.0000 |",
                         "| 10 | 1.0010 | 1.0000 |"]


@pytest.mark.parametrize("argv,message", [(["--gpus", "1"], "--gpus must be at least 2"),
                                          (["--max-steps", "1"], "--max-steps must be at least 2"),
                                          (["--mode", "big"], "invalid choice")])
def test_bad_arguments_stop_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        mg.parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_smoke_and_mode_defaults():
    smoke = mg.parse(["--smoke"])
    assert (smoke.mode, smoke.gpus, smoke.max_steps, smoke.logging_steps) == ("shape", 2, 4, 1)
    assert mg.parse([]).max_steps == 30 and mg.parse(["--mode", "small"]).max_steps is None  # the recipe's 20


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """`--smoke`: the tiny shape on 1 CPU process and on DDP over 2 gloo processes (~2.5 min on 2
    cores): the same losses, a resume that continues exactly, both ranks' memory, the files."""
    report = mg.main(["--smoke", "--out", str(tmp_path)])
    assert list(report["runs"]) == ["1gpu", "ddp2"] and report["resume_from_step"] == 2
    one, ddp = report["runs"]["1gpu"], report["runs"]["ddp2"]
    assert one["global_batch"] == ddp["global_batch"] == 16
    assert one["replay_matches"] and ddp["replay_matches"]  # the same rows per step
    assert ddp["vs_1gpu"]["loss"]["ok"] and ddp["vs_1gpu"]["loss"]["max_rel"] < 1e-4
    assert ddp["vs_1gpu"]["adapter"]["same_shapes"] and ddp["vs_1gpu"]["adapter"]["max_abs"] < 1e-2
    assert ddp["resume"]["loss"] == {"steps": [3, 4], "max_abs": 0.0, "max_rel": 0.0, "ok": True}
    assert ddp["resume"]["adapter"]["max_abs"] == 0.0 and len(ddp["memory_per_rank_gib"]) == 2
    assert json.loads((tmp_path / "multi_gpu.json").read_text())["runs"]["ddp2"]["name"] == "ddp2"
    assert "| ddp2 | 2 | 8 × 1 × 2 |" in (tmp_path / "multi_gpu.md").read_text()
