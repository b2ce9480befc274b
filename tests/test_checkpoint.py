"""The adapter folder format: a save/load roundtrip is exact for every method, loading needs no
RNG, a failed save leaves the old adapter whole, the wrong base or a non-finite tensor is refused,
and the base model is recorded so the adapter loads from any folder."""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch
import torch
from conftest import METHODS, cfg_for, load, mid, perturb

from rlora_cli.adapters import adapter_layers, inject_adapters
from rlora_cli.checkpoint import CONFIG_FILE, WEIGHTS_FILE, base_record, load_adapter, save_adapter
from rlora_cli.errors import UserError
from rlora_cli.testing import build_tiny_model

IDS = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))



@pytest.mark.parametrize("method", METHODS, ids=mid)
def test_save_load_roundtrip_is_exact(tiny_model_dir, tmp_path, method):
    model = inject_adapters(load(tiny_model_dir), cfg_for(method))
    perturb(model)
    expected = model(IDS).logits
    save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    torch.manual_seed(999)  # loading must not depend on the RNG state
    fresh = load_adapter(load(tiny_model_dir), tmp_path / "adapter")
    assert torch.equal(fresh(IDS).logits, expected)


def test_load_onto_a_float32_base_keeps_fp64_saved_values_close(tiny_model_dir, tmp_path):
    model = inject_adapters(load(tiny_model_dir, torch.float32), cfg_for(dict(type="rlora")))
    perturb(model)
    expected = model(IDS).logits
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(load(tiny_model_dir, torch.float32), tmp_path / "a")
    assert (fresh(IDS).logits - expected).abs().max().item() == 0.0


def test_failed_save_leaves_nothing_half_written(tiny_model_dir, tmp_path, monkeypatch):
    model = inject_adapters(load(tiny_model_dir), cfg_for(dict(type="rlora")))
    save_adapter(model, tmp_path / "adapter")
    before = (tmp_path / "adapter" / WEIGHTS_FILE).read_bytes()
    perturb(model)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dirs left
    assert (tmp_path / "adapter" / WEIGHTS_FILE).read_bytes() == before  # old adapter intact


def test_load_onto_the_wrong_base_is_refused_and_leaves_it_untouched(tiny_model_dir, tmp_path):
    model = inject_adapters(load(tiny_model_dir), cfg_for(dict(type="lora")))
    save_adapter(model, tmp_path / "adapter")
    other = load(build_tiny_model(tmp_path / "wide", hidden_size=96))
    with pytest.raises(UserError, match="has shape"):
        load_adapter(other, tmp_path / "adapter")
    assert not adapter_layers(other) and not hasattr(other, "rlora_config")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_adapter_is_refused_naming_file_and_tensor(tiny_model_dir, tmp_path, bad):
    model = inject_adapters(load(tiny_model_dir, torch.float32), cfg_for(dict(type="lora")))
    perturb(model)
    path = save_adapter(model, tmp_path / "adapter")
    tensors = safetensors.torch.load_file(str(path / WEIGHTS_FILE))
    name = list(tensors)[3]
    tensors[name][0, 0] = bad
    safetensors.torch.save_file(tensors, str(path / WEIGHTS_FILE))
    base = load(tiny_model_dir, torch.float32)
    with pytest.raises(UserError, match=rf"{WEIGHTS_FILE}: tensor {name} holds NaN or infinite") as e:
        load_adapter(base, path)
    assert "checkpoint" in e.value.fix and "\n" not in e.value.message
    assert not adapter_layers(base)  # refused before anything was injected


def test_hub_cache_folder_keeps_its_hub_id(tiny_model_dir, tmp_path):
    snapshot = tmp_path / "hub" / "models--Org--Tiny-Model" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    assert base_record(str(snapshot)) == {"base_model": str(snapshot), "base_model_hub_id": "Org/Tiny-Model"}
    assert base_record("Org/Not-Local") == {"base_model": "Org/Not-Local",
                                            "base_model_hub_id": "Org/Not-Local"}
