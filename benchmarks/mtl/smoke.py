"""The smoke setting: two tiny hand-made BIG-bench tasks and the offline tiny model, on the CPU.

One multiple-choice task (`colors`: target_scores) and one exact-match task (`sizes`: target), in
BIG-bench's JSON task format, so the smoke run exercises both scorers and the real loaders.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .plan import SMOKE_METHODS, Settings

THINGS = {"sky": "blue", "grass": "green", "sun": "yellow", "rose": "red", "sea": "blue", "leaf": "green",
          "lemon": "yellow", "fire": "red"}
SIZES = {"cat": "small", "city": "large", "mountain": "large", "bird": "small", "ocean": "large",
         "fish": "small", "tree": "large", "ball": "small"}


def write_tasks(folder: Path) -> Path:
    """Write colors/task.json and sizes/task.json (24 examples each) under `folder`; returns it."""
    colors = [{"input": f"What color is the {thing}{'?' * (1 + i % 3)}",
               "target_scores": {c: int(c == color) for c in ("red", "blue", "green", "yellow")}}
              for i in range(3) for thing, color in THINGS.items()]
    sizes = [{"input": f"Is the {thing} small or large{'?' * (1 + i % 3)}", "target": [size]}
             for i in range(3) for thing, size in SIZES.items()]
    for name, examples, extra in (("colors", colors, {"append_choices_to_input": True}),
                                  ("sizes", sizes, {})):
        task = {"name": name, "description": "rlora smoke task", "keywords": ["smoke"],
                "metrics": ["multiple_choice_grade" if name == "colors" else "exact_str_match"],
                "examples": examples, **extra}
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "task.json").write_text(json.dumps(task, indent=1))
    return folder


def smoke_settings(settings: Settings, model: str, methods_given: bool) -> Settings:
    """A few CPU steps on the tiny model: small rank, short rows, fp32, one seed."""
    return dataclasses.replace(
        settings, model=model, methods=settings.methods if methods_given else SMOKE_METHODS,
        seeds=settings.seeds[:1], r=4, num_heads=2, lora_alpha=8.0, target_modules="all-linear",
        val_size=4, max_train=16, max_length=64, num_epochs=1, max_steps=4, micro_batch_size=4,
        gradient_accumulation_steps=1, learning_rate=5e-3, dtype="fp32", precision="fp32", eval_batch_size=8,
        # a few steps: the benchmark's default warm-up would cover them all (a given one is kept)
        warmup_steps=1 if settings.warmup_steps == Settings.warmup_steps else settings.warmup_steps)


def tiny_model(folder: Path) -> Path:
    from rlora_cli.testing import build_tiny_model

    path = folder / "tiny-model"
    if not (path / "config.json").is_file():
        build_tiny_model(path, embedding_std=0.1)
    return path
