"""A transformers `Trainer` callback whose checkpoints hold the rlora adapter, never the base model.

    inject_adapters(model, AdapterConfig(type="rlora", r=8, num_heads=3))
    trainer = Trainer(model=model, args=TrainingArguments("out", save_steps=100), train_dataset=rows,
                      callbacks=[AdapterCheckpointCallback()])
    trainer.train()                                  # out/checkpoint-100/rlora_config.json ...
    trainer.train(resume_from_checkpoint=True)       # adapter, optimizer, schedule, RNG: all resume
    load_adapter(base_model, "out/checkpoint-100")   # or rlora eval --adapter out/checkpoint-100

How: while the Trainer trains, every tensor of the base model is on the model's
`_keys_to_ignore_on_save` (transformers' own list of what `save_pretrained` leaves out), so the
Trainer's checkpoint writes only the adapter's tensors as its model.safetensors: the base is never
written, and the Trainer's resume reads the adapter back from that file (its optimizer, scheduler
and RNG files are its own, untouched). After each save the callback adds rlora's adapter format
(rlora_config.json, rlora_adapter.safetensors) beside them, for load_adapter and the rlora
commands. The list is put back when training ends, so a later `save_pretrained` saves in full.
Single process or DDP; not FSDP or DeepSpeed ZeRO-3, whose parameters are sharded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from rlora_cli.adapters import adapter_layers, adapter_state
from rlora_cli.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from rlora_cli.errors import UserError


class AdapterCheckpointCallback(TrainerCallback):
    """Adapter-only checkpoints for a Trainer whose model went through `inject_adapters`.

    `metadata`: extra entries for each checkpoint's rlora_config.json (e.g. prompt templates)."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self.metadata = dict(metadata or {})
        self._kept: dict[int, Any] = {}  # id(model) -> its own _keys_to_ignore_on_save, put back at the end

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # Already at init, so that a resume (which loads weights before on_train_begin) finds the
        # base keys expected missing from the checkpoint and warns about none of them.
        self._base_off(model)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._base_off(model)  # for a callback added after init (trainer.add_callback)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            add_adapter_files(model, folder, {**self.metadata, "trainer_step": state.global_step})

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and id(model) in self._kept:
            model._keys_to_ignore_on_save = self._kept.pop(id(model))

    def _base_off(self, model: Any) -> None:
        """Put every tensor that is not the adapter's on the model's save-ignore list (once)."""
        if model is None or id(model) in self._kept:
            return
        if not adapter_layers(model):
            raise UserError("the Trainer's model has no rlora adapters",
                            "call inject_adapters(model, AdapterConfig(...)) before building the Trainer")
        self._kept[id(model)] = model._keys_to_ignore_on_save
        model._keys_to_ignore_on_save = set(model.state_dict()) - set(adapter_state(model))


def add_adapter_files(model: Any, folder: Path, metadata: dict[str, Any]) -> None:
    """rlora_config.json and rlora_adapter.safetensors into an existing checkpoint folder.

    save_adapter replaces the folder it writes; here it writes a hidden one inside the checkpoint,
    whose two files are then moved up beside the Trainer's."""
    staging = folder / ".rlora-adapter"
    save_adapter(model, staging, metadata=metadata)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        os.replace(staging / name, folder / name)
    shutil.rmtree(staging, ignore_errors=True)
