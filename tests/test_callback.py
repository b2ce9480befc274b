"""AdapterCheckpointCallback: a real transformers Trainer on the tiny model checkpoints the adapter
alone, the adapter it saves reproduces the trained model's logits, and the Trainer resumes from it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from rlora_cli.adapters import AdapterConfig, adapter_state, inject_adapters
from rlora_cli.callback import AdapterCheckpointCallback
from rlora_cli.checkpoint import load_adapter
from rlora_cli.errors import UserError

CFG = AdapterConfig(type="rlora", r=4, num_heads=2, lora_alpha=8, target_modules="all-linear")


def rows(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (n, length), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def adapted(model_dir, seed: int = 0):
    torch.manual_seed(seed)
    model = load(model_dir, torch.float32)
    inject_adapters(model, CFG)
    return model


def trainer(model, out, max_steps: int, **kw) -> Trainer:
    args = TrainingArguments(str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
                             logging_steps=100, **kw)
    return Trainer(model=model, args=args, train_dataset=rows(), callbacks=[AdapterCheckpointCallback()])


def test_checkpoints_hold_the_adapter_alone_and_reload_to_the_same_logits(tmp_path, tiny_model_dir):
    model = adapted(tiny_model_dir)
    own = set(model._keys_to_ignore_on_save)
    trainer(model, tmp_path, max_steps=4).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    ckpt = tmp_path / "checkpoint-4"
    trained = {k: v.detach().clone() for k, v in adapter_state(model).items()}
    saved = load_file(str(ckpt / "rlora_adapter.safetensors"))
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in trained)
    config = json.loads((ckpt / "rlora_config.json").read_text())
    assert config["method"] == "rlora" and config["trainer_step"] == 4
    # The Trainer's own weights file (what its resume reads) holds the adapter's tensors, no base one.
    assert set(load_file(str(ckpt / "model.safetensors"))) == set(trained)
    assert not list(ckpt.glob("pytorch_model*")) and not (ckpt / ".rlora-adapter").exists()
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()
    assert model._keys_to_ignore_on_save == own  # put back: a later save_pretrained saves in full

    ids = rows(2)[0]["input_ids"][None]
    fresh = load_adapter(load(tiny_model_dir, torch.float32), ckpt)
    assert torch.equal(fresh.eval()(ids).logits, model.eval()(ids).logits)


class StopAt(TrainerCallback):
    """An interruption: the run stops after `step` (and its checkpoint), its schedule unchanged."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def test_a_resumed_trainer_ends_where_the_straight_one_does(tmp_path, tiny_model_dir):
    trainer(adapted(tiny_model_dir), tmp_path / "straight", max_steps=4).train()
    interrupted = trainer(adapted(tiny_model_dir), tmp_path / "resumed", max_steps=4)
    interrupted.add_callback(StopAt(2))
    interrupted.train()
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    # A fresh model (another adapter init: the checkpoint must replace it) and Trainer, as after a crash.
    restarted = trainer(adapted(tiny_model_dir, seed=1), tmp_path / "resumed", max_steps=4)
    restarted.train(resume_from_checkpoint=True)
    straight = load_file(str(tmp_path / "straight" / "checkpoint-4" / "rlora_adapter.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "rlora_adapter.safetensors"))
    assert straight.keys() == again.keys()
    for k in straight:
        torch.testing.assert_close(again[k], straight[k], rtol=0, atol=0)


def test_a_model_without_adapters_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="has no rlora adapters"):
        trainer(load(tiny_model_dir, torch.float32), tmp_path, max_steps=2)
