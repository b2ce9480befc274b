"""benchmarks.profile_train on the CPU: it trains the recipe, profiles the last steps and writes
a summary and a Chrome trace."""

from __future__ import annotations

import json

from test_train import write_recipe

from benchmarks.profile_train import main


def test_profile_train_reports_the_profiled_steps(tmp_path, learnable_model_dir, capsys):
    recipe = write_recipe(tmp_path, learnable_model_dir, output={"save_steps": 0})
    main([recipe, "train.gradient_accumulation_steps=1", "--steps", "4", "--active", "2", "--out", str(tmp_path / "p")])
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert len(summary["wall_ms_per_step"]) == 2 and all(w > 0 for w in summary["wall_ms_per_step"])
    assert summary["kernels_per_step"] == 0 and summary["gpu_busy_ms_per_step"] == 0  # no CUDA here
    assert (tmp_path / "p" / "trace.json").stat().st_size > 0
    assert (tmp_path / "p" / "run" / "adapter" / "rlora_adapter.safetensors").is_file()
    assert "Self CPU" in capsys.readouterr().out
