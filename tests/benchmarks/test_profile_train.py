"""benchmarks.profile_train on the CPU: it trains the recipe, profiles exactly the last --active
steps (not the end-of-run saving) and writes a summary and a Chrome trace."""

from __future__ import annotations

import json

import pytest

import rlora_cli.training.loop as train_mod
from benchmarks.profile_train import main
from rlora_cli.testing import write_recipe


def test_profile_train_profiles_the_last_steps_only(tmp_path, learnable_model_dir, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, learnable_model_dir, output={"save_steps": 0})
    real_save = train_mod.save_adapter
    saw_profiler = []

    def save_adapter(*a, **k):  # the final save runs after the profiled steps
        import torch.autograd.profiler as ap
        saw_profiler.append(ap._is_profiler_enabled)
        return real_save(*a, **k)

    monkeypatch.setattr(train_mod, "save_adapter", save_adapter)
    main([recipe, "train.gradient_accumulation_steps=1", "--steps", "4", "--active", "2",
          "--out", str(tmp_path / "p")])
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert len(summary["wall_ms_per_step"]) == 2 and all(w > 0 for w in summary["wall_ms_per_step"])
    assert saw_profiler and not any(saw_profiler)  # the checkpoint and the final adapter
    assert (tmp_path / "p" / "trace.json").stat().st_size > 0
    assert (tmp_path / "p" / "run" / "adapter" / "rlora_adapter.safetensors").is_file()
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out  # the profiled steps' operations
    with pytest.raises(SystemExit):
        main([recipe, "--steps", "2", "--active", "2", "--out", str(tmp_path / "q")])
