"""Each recipe section checks itself when built, with the loader's messages; one dtype vocabulary."""

from __future__ import annotations

import math

import pytest

from rlora_cli.config import (
    DTYPE_NAMES,
    DTYPES,
    DataConfig,
    DatasetConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    canonical_dtype,
)
from rlora_cli.errors import UserError


def problems(make) -> list[str]:
    with pytest.raises(UserError) as info:
        make()
    return info.value.problems


def test_every_section_refuses_bad_values_when_built():
    assert problems(lambda: TrainConfig(learning_rate=-1)) == ["train.learning_rate: must be > 0, got -1"]
    assert problems(lambda: TrainConfig(learning_rate=math.nan, warmup_ratio=1.0, lr_scheduler="step")) == [
        "train.learning_rate: must be > 0, got nan",
        "train.warmup_ratio: must be in [0, 1), got 1",
        "train.lr_scheduler: unknown value 'step'; choose one of linear, cosine, constant"]
    assert problems(lambda: ModelConfig(name_or_path=" ", dtype="half")) == [
        "model.name_or_path: empty; give a hub id or a local model folder",
        "model.dtype: unknown value 'half'; choose one of auto, bf16, bfloat16, fp16, float16, fp32, float32"]
    assert problems(lambda: OutputConfig(logging_steps=0)) == ["output.logging_steps: must be >= 1, got 0"]
    assert problems(lambda: DataConfig(datasets=(), temperature=0.0)) == [
        "data.temperature: must be > 0, got 0", "data.datasets: empty; list at least one source"]
    # a source does not know its index; the loader puts it in the brackets
    assert problems(lambda: DatasetConfig(path="a.jsonl", kind="summary", weight=0.0)) == [
        "data.datasets[].kind: unknown value 'summary'; choose one of instruction, nlu, knowledge, chat",
        "data.datasets[].weight: must be > 0, got 0"]


def test_good_sections_build():
    source = DatasetConfig(path="a.jsonl", kind="nlu", label_words=["no", "yes"])
    assert source.label_words == ("no", "yes")
    assert DataConfig(datasets=(source,)).datasets == (source,)
    assert TrainConfig(max_grad_norm=math.inf).max_grad_norm == math.inf


def test_one_dtype_vocabulary():
    assert DTYPES == tuple(DTYPE_NAMES)
    assert [canonical_dtype(n, "--dtype") for n in ("auto", "bf16", "bfloat16", "fp16", "fp32")] == [
        "auto", "bfloat16", "bfloat16", "float16", "float32"]
    with pytest.raises(UserError, match=r"--dtype: unknown dtype 'half' — use auto \| bf16 \| fp16 \| fp32"):
        canonical_dtype("half", "--dtype")
