"""Short CPU training runs on the tiny model: the loop, its files, exact resume, accumulation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import rlora_cli.training.loop as train_mod
import rlora_cli.training.rundir as rundir
from rlora_cli.cli import main
from rlora_cli.errors import UserError
from rlora_cli.report import train as report
from rlora_cli.report.train import smooth
from rlora_cli.testing import adapter_tensors, metrics, write_recipe
from rlora_cli.training.loop import TrainingDiverged, train


def test_loss_falls_and_the_run_directory_is_complete(tmp_path, learnable_model_dir):
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 30, "learning_rate": 1e-2,
                                                            "lr_scheduler": "constant"},
                          output={"save_steps": 10, "logging_steps": 5, "eval_steps": 15})
    run = train(recipe, output=tmp_path / "run")
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert set(rows[0]["task_loss"]) == {"facts", "reviews"}
    assert {"lr", "grad_norm", "tokens", "tokens_per_s"} <= set(rows[0])
    evals = [r for r in metrics(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and set(evals[0]["eval_loss"]) == {"facts", "reviews"}
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 30
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["seed"] == 0 and info["trainable_parameters"] > 0
    mixture = (run / "mixture.json").read_text()
    assert json.loads(mixture) and "facts" in mixture and "reviews" in mixture
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]  # limit 2
    assert (run / "checkpoint-30" / "trainer_state.json").is_file()
    config = json.loads((run / "adapter" / "rlora_config.json").read_text())
    assert config["method"] == "rlora" and config["templates"]
    assert (run / "adapter" / "tokenizer.json").is_file()
    assert (run / "plots" / "loss.png").stat().st_size > 0 and (run / "plots" / "task_loss.png").is_file()


@pytest.mark.parametrize("deferred,after_step", [(False, False), (True, False), (False, True)])
def test_resume_after_ctrl_c_is_bit_identical(tmp_path, learnable_model_dir, monkeypatch, deferred,
                                              after_step):
    """Deferred: a fused optimizer (as on CUDA) whose losses are read one step late; logged every
    5 steps, so the interrupt in step 5 finds step 4 still unread, and its checkpoint must count it.
    after_step: the interrupt comes after step 4 is done (while it logs), not inside a step."""
    if deferred:
        monkeypatch.setattr(train_mod, "_fused_optimizer", lambda accelerator: True)
    recipe = write_recipe(tmp_path, learnable_model_dir, output={"logging_steps": 5} if deferred else {})
    straight = train(recipe, output=tmp_path / "straight")

    calls = {"n": 0}
    real, real_log = train_mod.token_losses, train_mod.LogWindow.maybe_log
    stop_at = 10 if deferred else 8  # the 2nd micro-batch of step 5 (4): its first one already drew dropout

    def interrupt_mid_step(model, batch, **kw):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real(model, batch, **kw)

    def interrupt_after_step_4(self, state, *a, **k):
        if state.step == 4:
            raise KeyboardInterrupt
        return real_log(self, state, *a, **k)

    if after_step:
        monkeypatch.setattr(train_mod.LogWindow, "maybe_log", interrupt_after_step_4)
    else:
        monkeypatch.setattr(train_mod, "token_losses", interrupt_mid_step)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, output=tmp_path / "resumed")
    assert (tmp_path / "resumed" / f"checkpoint-{4 if after_step else stop_at // 2 - 1}").is_dir()
    monkeypatch.setattr(train_mod, "token_losses", real)
    monkeypatch.setattr(train_mod.LogWindow, "maybe_log", real_log)
    resumed = train(recipe, output=tmp_path / "resumed", resume="auto")

    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A logging window that spans the resume averages only the steps after it: step 5's loss
    # under deferred's 5-step windows. Gradient norms and token counts still match exactly.
    losses = lambda run: [(r["step"], None if deferred and r["step"] == 5 else r["loss"], r["grad_norm"],  # noqa: E731
                           r["tokens"]) for r in metrics(run) if "loss" in r]
    # After step 4 the interrupt came while step 4's line was being logged: that line is lost.
    expected = [row for row in losses(straight) if not (after_step and row[0] == 4)]
    assert expected == losses(resumed) and len(losses(straight)) == (2 if deferred else 6)


def test_accumulation_4x2_equals_8x1(tmp_path, learnable_model_dir):
    common = {"max_steps": 2, "lr_scheduler": "constant", "warmup_ratio": 0.0}
    runs = {}
    for micro, accum in ((4, 2), (8, 1)):
        folder = tmp_path / f"{micro}x{accum}"
        folder.mkdir()
        recipe = write_recipe(folder, learnable_model_dir, adapter={"lora_dropout": 0.0},
                              train={**common, "micro_batch_size": micro,
                                     "gradient_accumulation_steps": accum})
        runs[micro] = adapter_tensors(train(recipe, output=folder / "run"))
    for key in runs[4]:
        torch.testing.assert_close(runs[4][key], runs[8][key], rtol=0, atol=1e-5)
    routers = [k for k in runs[4] if k.endswith("rlora_router")]
    assert routers and all(runs[4][k].abs().sum() > 0 for k in routers)  # trained: routers start at 0


def test_a_non_empty_output_is_refused_unless_overwrite(tmp_path, learnable_model_dir):
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 1})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--resume auto") as e:
        train(recipe, output=tmp_path / "run")
    assert "--overwrite" in e.value.message
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # nothing touched
    train(recipe, output=tmp_path / "run", overwrite=True)
    assert not (tmp_path / "run" / "notes.txt").exists() and (tmp_path / "run" / "adapter").is_dir()


def test_resume_refuses_a_changed_recipe(tmp_path, learnable_model_dir):
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 2}, output={"save_steps": 1})
    train(recipe, output=tmp_path / "run")
    with pytest.raises(UserError, match="adapter.r"):
        train(recipe, ("adapter.r=8",), output=tmp_path / "run", resume="auto")
    train(recipe, ("train.max_steps=3",), output=tmp_path / "run", resume="auto")  # allowed change
    assert (tmp_path / "run" / "checkpoint-3").is_dir()


# the check must not wait for a log line
@pytest.mark.parametrize("logging_steps,deferred", [(1, False), (10, False), (10, True)])
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, learnable_model_dir, monkeypatch, logging_steps, deferred):
    """Deferred: a fused optimizer (as on CUDA), whose step's loss is read one step late; step 3
    is found at step 4, before anything is saved (checkpoints every 2 steps)."""
    if deferred:
        monkeypatch.setattr(train_mod, "_fused_optimizer", lambda accelerator: True)
    recipe = write_recipe(tmp_path, learnable_model_dir,
                          train={"max_steps": 4, "gradient_accumulation_steps": 1},
                          output={"save_steps": 2 if deferred else 1, "logging_steps": logging_steps})
    real, calls = train_mod.token_losses, {"n": 0}

    def nan_at_step_3(model, batch, **kw):
        calls["n"] += 1
        loss = real(model, batch, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod, "token_losses", nan_at_step_3)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(recipe, output=tmp_path / "run")
    kept = ["checkpoint-2"] if deferred else ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == kept
    kept = load_file(str(tmp_path / "run" / "checkpoint-2" / "adapter" / "rlora_adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_deferred_loss_reads_skip_a_nan_update_on_the_device():
    """The fused optimizer skips the step whose loss is not finite (found_inf) before the host
    has read it; the reads come back one step late, in order, and flush returns the rest."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    reads = train_mod.LossReads(opt, defer=True)
    w.grad = torch.full((3,), float("nan"))
    assert reads.push(torch.tensor([float("nan"), 5.0], dtype=torch.float64), 1) == []
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3))  # skipped
    w.grad = torch.ones(3)
    (step, loss, n), = reads.push(torch.tensor([2.0, 4.0], dtype=torch.float64), 2)
    assert step == 1 and math.isnan(loss) and n == 5.0
    opt.step()
    assert bool((w.detach() < 1).all())  # applied
    assert reads.flush() == [(2, 2.0, 4.0)] and reads.flush() == []
    plain = train_mod.LossReads(opt, defer=False)
    assert plain.push(torch.tensor([1.0, 2.0]), 7) == [(7, 1.0, 2.0)]


def test_deferred_reads_log_the_same_run(tmp_path, learnable_model_dir, monkeypatch):
    """The fused optimizer's deferred reads change when the host reads a step, not what it logs."""
    runs = {}
    for deferred in (False, True):
        monkeypatch.setattr(train_mod, "_fused_optimizer", lambda accelerator: deferred)
        (tmp_path / str(deferred)).mkdir()
        recipe = write_recipe(tmp_path / str(deferred), learnable_model_dir,
                              output={"logging_steps": 2, "save_steps": 3, "eval_steps": 4})
        rows = metrics(train(recipe, output=tmp_path / str(deferred) / "run"))
        runs[deferred] = [(r["step"], r.get("loss"), r.get("tokens")) for r in rows]
        # Step 3 is saved but neither logged nor evaluated: its checkpoint still counts its tokens.
        state_file = tmp_path / str(deferred) / "run" / "checkpoint-3" / "trainer_state.json"
        saved = json.loads(state_file.read_text())
        logged = {r["step"]: r["tokens"] for r in rows if "tokens" in r}
        assert logged[2] < saved["tokens"] < logged[4]
    assert [r[0] for r in runs[True]] == [r[0] for r in runs[False]]
    for (_, a, ta), (_, b, tb) in zip(runs[False], runs[True]):
        assert ta == tb and (a is None) == (b is None)
        assert a is None or b == pytest.approx(a, rel=1e-5)


def test_cli_exit_codes(tmp_path, learnable_model_dir, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 1})
    with pytest.raises(SystemExit) as e:
        main(["train", recipe, "train.max_steps=oops"])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["train", recipe, "--output", str(tmp_path / "busy")])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err
    monkeypatch.setattr(train_mod, "token_losses",
                        lambda m, b, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        main(["train", recipe, "--output", str(tmp_path / "int")])
    assert e.value.code == 130


def test_train_help_documents_every_flag(capsys):
    main(["train", "--help"])  # help returns normally: exit code 0
    out = capsys.readouterr().out
    for flag in ("--output", "--resume", "--overwrite", "--dry-run", "KEY=VALUE"):
        assert flag in out


def test_gradient_checkpointing_trains_the_adapters_identically(tmp_path, learnable_model_dir):
    runs = {}
    for ckpt in (False, True):
        folder = tmp_path / f"ckpt{ckpt}"
        folder.mkdir()
        recipe = write_recipe(folder, learnable_model_dir,
                              train={"max_steps": 2, "gradient_checkpointing": ckpt})
        runs[ckpt] = adapter_tensors(train(recipe, output=folder / "run"))
    for key in runs[True]:  # dropout is on: checkpointing replays the same RNG in recomputation
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=0, atol=1e-6)
    routers = [k for k in runs[True] if k.endswith("rlora_router")]
    assert all(runs[True][k].abs().sum() > 0 for k in routers)  # trained (routers start at 0)


def test_a_tracker_that_is_not_installed_is_a_clear_error(tmp_path, learnable_model_dir, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False, raising=False)
    monkeypatch.setattr("accelerate.tracking.is_tensorboard_available", lambda: False, raising=False)
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 1},
                          output={"log_with": "tensorboard"})
    with pytest.raises(UserError, match="output.log_with: tensorboard is not installed"):
        train(recipe, output=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compile_trains_like_eager_and_saves_plain_names(tmp_path, learnable_model_dir):
    """train.compile: torch.compile'd training matches eager and the adapter keys carry no _orig_mod."""
    runs = {}
    for compiled in (False, True):
        folder = tmp_path / f"compile{compiled}"
        folder.mkdir()
        recipe = write_recipe(folder, learnable_model_dir, adapter={"lora_dropout": 0.0},
                              train={"max_steps": 3, "compile": compiled})
        runs[compiled] = adapter_tensors(train(recipe, output=folder / "run"))
    assert runs[True].keys() == runs[False].keys()
    for key in runs[True]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=0, atol=1e-6)


def test_plotted_curves_end_at_the_last_logged_loss(tmp_path, monkeypatch):
    """A short run's per-task curve once ended at 1.15 where the log said 0.63 (a trailing mean)."""
    losses = [2.4, 2.1, 1.9, 1.6, 1.2, 0.95, 0.8, 0.63]
    rows = [{"step": 10 * (i + 1), "loss": v, "task_loss": {"a": v, "b": v + 0.5}}
            for i, v in enumerate(losses)]
    lines, real_save = {}, report.save_png

    def save(fig, path):
        lines[path.name] = [(line.get_label(), list(line.get_ydata())) for line in fig.axes[0].get_lines()]
        return real_save(fig, path)

    monkeypatch.setattr(report, "save_png", save)
    report.plot_losses(rows, tmp_path / "plots")
    for name, last in (("loss.png", 0.63), ("task_loss.png", 0.63)):
        curves = [y for label, y in lines[name] if not label.startswith("_")]  # the labelled (smoothed) ones
        assert curves and len(lines[name]) == 2 * len(curves)  # each with its raw points
        assert any(y[-1] == pytest.approx(last) for y in curves)
        assert all(len(y) == len(losses) for _, y in lines[name])
    assert (tmp_path / "plots" / "task_loss.png").stat().st_size > 0


def test_smoothing_is_centred_and_keeps_the_ends():
    ramp = [float(i) for i in range(20)]
    assert smooth(ramp) == ramp  # a centred mean does not lag a trend
    noisy = [1.0 + (-1) ** i * 0.5 for i in range(20)]
    out = smooth(noisy)
    assert out[0] == noisy[0] and out[-1] == noisy[-1]
    assert max(out[2:-2]) - min(out[2:-2]) < 0.25  # and it does smooth
    assert smooth([3.0]) == [3.0] and smooth([]) == []


def test_save_minutes_checkpoints_by_the_clock(tmp_path, learnable_model_dir, monkeypatch):
    """save_minutes=1 and 50 s a step (25 s a micro-batch): a checkpoint every second step.
    Deferred reads (a fused optimizer, as on CUDA) see the main process's vote a step late unless
    a log line reads it first; the checkpoint it makes still counts every step's tokens."""
    now, real = {"t": 0.0}, train_mod.token_losses

    def losses(model, batch, **kw):
        now["t"] += 25.0
        return real(model, batch, **kw)

    monkeypatch.setattr(rundir, "_now", lambda: now["t"])
    monkeypatch.setattr(train_mod, "token_losses", losses)
    runs = {}
    for deferred, logging_steps, expected in ((False, 1, [2, 4, 6]), (True, 5, [3, 5, 6])):
        monkeypatch.setattr(train_mod, "_fused_optimizer", lambda accelerator: deferred)
        now["t"] = 0.0
        folder = tmp_path / str(deferred)
        folder.mkdir()
        recipe = write_recipe(folder, learnable_model_dir, output={
            "save_steps": 0, "save_minutes": 1, "save_total_limit": 0, "logging_steps": logging_steps})
        runs[deferred] = run = train(recipe, output=folder / "run")
        assert sorted(rundir._step(p) for p in run.glob("checkpoint-*")) == expected
    tokens = {r["step"]: r["tokens"] for r in metrics(runs[False]) if "tokens" in r}  # logged every step
    for step in (3, 5):
        saved = json.loads((runs[True] / f"checkpoint-{step}" / rundir.STATE_FILE).read_text())
        assert saved["tokens"] == tokens[step]
