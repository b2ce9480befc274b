"""Each recipe section checks itself when built, with the loader's messages; one dtype vocabulary."""

from __future__ import annotations

import math

import pytest
import yaml

from rlora_cli.adapters import AdapterConfig
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
from rlora_cli.config.model import QuantizationConfig
from rlora_cli.errors import UserError
from rlora_cli.recipe.load import load_recipe, recipe_to_dict
from rlora_cli.testing import write_recipe


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
        "data.datasets[].kind: unknown value 'summary'; choose one of instruction, nlu, knowledge, chat, "
        "completion, text",
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


# ------------------------------------------------------------------ model.quantization (QLoRA)


def test_quantization_defaults_follow_the_bits():
    four = QuantizationConfig(bits=4, type="nf4", double_quant=True, compute_dtype="auto")
    assert QuantizationConfig() == four
    eight = QuantizationConfig(bits=8)
    assert (eight.type, eight.double_quant, eight.compute_dtype) == (None, None, None)
    assert ModelConfig(name_or_path="m").quantization is None


def test_quantization_refuses_bad_values_naming_the_key():
    assert problems(lambda: QuantizationConfig(bits=3)) == ["model.quantization.bits: must be 4 or 8, got 3"]
    assert problems(lambda: QuantizationConfig(bits=8, type="nf4", compute_dtype="bf16")) == [
        "model.quantization.type: applies to 4-bit only; remove it for bits: 8",
        "model.quantization.compute_dtype: applies to 4-bit only; remove it for bits: 8"]
    assert problems(lambda: QuantizationConfig(type="int4", compute_dtype="half")) == [
        "model.quantization.type: unknown value 'int4'; choose one of nf4, fp4",
        "model.quantization.compute_dtype: unknown value 'half'; choose one of auto, bf16, bfloat16, fp16, "
        "float16, fp32, float32"]


# The YAML form: recipe/load.py builds `model.quantization` from a mapping, as it builds data.datasets.


def test_quantization_from_yaml_and_overrides_round_trips(tmp_path):
    recipe = write_recipe(tmp_path, "some-model", model={"quantization": {"bits": 4, "type": "fp4"}})
    q = load_recipe(recipe).model.quantization
    assert q == QuantizationConfig(bits=4, type="fp4", double_quant=True, compute_dtype="auto")
    plain = recipe_to_dict(load_recipe(recipe, ["model.quantization=null"]))
    assert plain["model"]["quantization"] is None
    # --print-config's output is a recipe again, and an override reaches into a null subsection
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(plain))
    assert load_recipe(tmp_path / "printed.yaml", ["model.quantization.bits=8"]).model.quantization == \
        QuantizationConfig(bits=8)
    full = recipe_to_dict(load_recipe(recipe, ["model.quantization.compute_dtype=bf16"]))
    assert full["model"]["quantization"] == {"bits": 4, "type": "fp4", "double_quant": True,
                                             "compute_dtype": "bf16"}
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full))
    assert recipe_to_dict(load_recipe(tmp_path / "full.yaml")) == full


def test_quantization_from_an_absent_section_by_override(tmp_path):
    recipe = write_recipe(tmp_path, "some-model")
    assert load_recipe(recipe).model.quantization is None
    assert load_recipe(recipe, ["model.quantization.bits=4"]).model.quantization == QuantizationConfig()


@pytest.mark.parametrize("override, message", [
    ("model.quantization.bits=3", "model.quantization.bits: must be 4 or 8, got 3"),
    ("model.quantization.bits=four", "model.quantization.bits: must be an integer, got 'four'"),
    ("model.quantization=4", "model.quantization: must be a mapping"),
    ("model.quantization.bitz=4", "model.quantization.bitz: unknown key; did you mean "
                                  "`model.quantization.bits`?"),
    ("model.load_in_4bit=true", "`load_in_4bit` is axolotl/transformers's name; rlora calls it "
                                "`model.quantization.bits: 4`"),
    ("quantization_bit=4", "`quantization_bit` is LLaMA-Factory's name; rlora calls it "
                           "`model.quantization.bits`"),
    ("model.bits=4", "model.bits: unknown key here; it belongs in `model.quantization.bits`"),
])
def test_bad_quantization_yaml_names_the_key(tmp_path, override, message):
    recipe = write_recipe(tmp_path, "some-model")
    with pytest.raises(UserError) as info:
        load_recipe(recipe, [override])
    assert message in info.value.problems[0]


def test_multilora_gates_train_at_ten_times_the_rate_by_default(tmp_path):
    """gate_lr_ratio defaults to 10 for multilora (the preset and a config built in code agree),
    and stays 1 for the methods without scalar gates."""
    assert AdapterConfig(type="multilora").gate_lr_ratio == 10.0
    assert AdapterConfig(type="rlora").gate_lr_ratio == 1.0
    recipe = load_recipe(write_recipe(tmp_path, "m", adapter={"type": "multilora"}))
    assert recipe.adapter.gate_lr_ratio == 10.0
    recipe = load_recipe(write_recipe(tmp_path, "m", adapter={"type": "multilora", "gate_lr_ratio": 1}))
    assert recipe.adapter.gate_lr_ratio == 1.0
