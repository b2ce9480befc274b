"""`rlora init` (starter.write_starter): the starter recipe loads, trains as written on the tiny model
from any folder, spells out each method's preset, and refuses to replace what exists."""

from __future__ import annotations

import pytest
import yaml

import rlora_cli.starter as starter
from rlora_cli.adapters import METHODS, AdapterConfig
from rlora_cli.api import train
from rlora_cli.config import KINDS
from rlora_cli.errors import UserError
from rlora_cli.recipe.load import adapter_preset, load_recipe


def test_the_starter_loads_from_any_folder_and_trains_as_written(tmp_path, tiny_model_dir, monkeypatch):
    out = starter.write_starter(tmp_path / "mine.yaml", model=str(tiny_model_dir))
    assert out == tmp_path / "mine.yaml"
    text = out.read_text()
    assert text.startswith("# rlora train mine.yaml")
    elsewhere = "lora_rank (LLaMA-Factory)", "lora_target_modules (axolotl)", "r (PEFT)", "cutoff_len"
    assert all(name in text for name in elsewhere)
    monkeypatch.chdir(tmp_path.parent)  # the data paths are absolute: another folder reads them too
    recipe = load_recipe(out)
    assert sorted(d.kind for d in recipe.data.datasets) == sorted(KINDS)  # one source of every kind
    assert recipe.adapter == AdapterConfig(**adapter_preset("rlora"))
    assert recipe.model.name_or_path == str(tiny_model_dir) and recipe.output.dir == "runs/mine"

    result = train(out, ["train.max_steps=2"], output=tmp_path / "run")
    assert result.metrics["step"] == 2
    assert set(result.metrics["eval_loss"]) == {d.name for d in recipe.data.datasets}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gets_its_preset(tmp_path, method):
    out = starter.write_starter(tmp_path / f"{method}.yaml", method=method)
    assert load_recipe(out).adapter == AdapterConfig(**adapter_preset(method))
    assert yaml.safe_load(out.read_text())["model"]["name_or_path"] == starter.DEFAULT_MODEL


def test_what_exists_is_kept_unless_overwrite(tmp_path):
    out = starter.write_starter(tmp_path / "s.yaml")
    out.write_text("# mine\n")
    with pytest.raises(UserError, match=r"s\.yaml exists — pass --overwrite"):
        starter.write_starter(out)
    assert out.read_text() == "# mine\n"
    out.unlink()
    with pytest.raises(UserError, match=r"s_data exists"):  # the data folder alone is kept too
        starter.write_starter(out)
    assert not out.exists()
    starter.write_starter(out, overwrite=True, method="lora")
    assert load_recipe(out).adapter.type == "lora"


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown method 'dora' — choose one of lora, multilora, hydralora"):
        starter.write_starter(tmp_path / "s.yaml", method="dora")
    with pytest.raises(UserError, match="ends in .yaml"):
        starter.write_starter(tmp_path / "s")
    assert not any(tmp_path.iterdir())


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(starter, "atomic_write_text", full_disk)
    with pytest.raises(OSError):
        starter.write_starter(tmp_path / "s.yaml")
    assert not any(tmp_path.iterdir())  # the data folder went too: the rerun is not refused
