"""Loading a model (+ an adapter): the adapter's recorded base from any folder, a moved base named
with --model, a warning (returned, not printed) for another base, a refusal on a shape mismatch,
remote code only with the flag, and one dtype vocabulary."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import LlamaForCausalLM

from rlora_cli.adapters import AdapterConfig, inject_adapters
from rlora_cli.checkpoint import read_adapter_config, save_adapter
from rlora_cli.config.model import QuantizationConfig
from rlora_cli.errors import UserError
from rlora_cli.model import (
    _load_error,
    load_model,
    load_with_adapter,
    quantization_record,
    recorded_quantization,
    resolve_dtype,
)
from rlora_cli.report.eval import print_warnings
from rlora_cli.testing import build_tiny_model


def test_adapter_loads_on_its_recorded_base(adapter_dir, lm):
    path, adapted = adapter_dir
    model, tok, info = load_with_adapter(None, str(path), dtype="float32")
    assert (info.base, info.adapter, info.warnings) == (str(lm[0].name_or_path), str(path), [])
    assert not model.training
    ids = lm[1]("The red cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted(ids).logits)
        assert not torch.allclose(model(ids).logits, lm[0](ids).logits)


def test_adapter_on_another_base_warns_and_refuses_on_shape_mismatch(adapter_dir, tmp_path, capsys):
    path, _ = adapter_dir
    same_shape = build_tiny_model(tmp_path / "copy")
    _, _, info = load_with_adapter(str(same_shape), str(path), dtype="float32")
    assert "was trained on" not in "".join(capsys.readouterr())  # returned, not printed
    [warning] = info.warnings
    assert "was trained on" in warning and str(same_shape) in warning
    console = Console(file=io.StringIO(), width=400)
    print_warnings(info.warnings, console)
    assert "warning" in console.file.getvalue() and "was trained on" in console.file.getvalue()
    smaller = build_tiny_model(tmp_path / "small", hidden_size=32)
    with pytest.raises(UserError, match="shape"):
        load_with_adapter(str(smaller), str(path), dtype="float32")


def test_one_dtype_vocabulary():
    assert resolve_dtype("bf16") == resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("fp16") == resolve_dtype("float16") == torch.float16
    assert resolve_dtype("fp32") == resolve_dtype("float32") == torch.float32
    assert resolve_dtype("auto") in (torch.bfloat16, torch.float32)
    with pytest.raises(UserError, match="--dtype: unknown dtype 'half'"):
        resolve_dtype("half", "--dtype")


# ------------------------------------------------------------- adapters from anywhere, base gone


def _adapter_over(base: Path, out: Path, **save_kw) -> Path:
    model, tok = load_model(str(base), dtype="float32")
    inject_adapters(model, AdapterConfig(type="lora", r=2, target_modules=["q_proj"]))
    return save_adapter(model, out, tokenizer=tok, **save_kw)


def test_adapter_saved_from_a_relative_base_loads_from_any_folder(tiny_model_dir, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / ".models" / "tiny")
    monkeypatch.chdir(project)
    adapter = _adapter_over(Path(".models/tiny"), Path("runs/demo/adapter"))
    config = read_adapter_config(adapter)
    assert config["base_model"] == str(project / ".models" / "tiny")  # absolute, not as given
    assert config["trust_remote_code"] is False
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, _, info = load_with_adapter(None, str(project / "runs" / "demo" / "adapter"), dtype="float32")
    assert info.base == str(project / ".models" / "tiny")
    # An older adapter recorded the path as given: found above the adapter, whatever the working folder.
    config["base_model"] = ".models/tiny"
    (project / "runs" / "demo" / "adapter" / "rlora_config.json").write_text(json.dumps(config))
    _, _, info = load_with_adapter(None, str(project / "runs" / "demo" / "adapter"), dtype="float32")
    assert Path(info.base) == project / ".models" / "tiny"
    shutil.move(project / ".models", project / ".models-moved")
    with pytest.raises(UserError, match=r"\.models/tiny is not in the working folder") as e:
        load_with_adapter(None, str(project / "runs" / "demo" / "adapter"), dtype="float32")
    assert "--model" in e.value.fix
    # --model names the base; the record is then only compared for the warning.
    load_with_adapter(str(project / ".models-moved" / "tiny"), str(project / "runs" / "demo" / "adapter"),
                      dtype="float32")



# ------------------------------------------------------------------------------- quantized bases


def test_an_adapter_records_the_quantization_it_trained_over(adapter_dir):
    """The record is what load_with_adapter loads the base with (tests/test_quant.py runs it)."""
    assert recorded_quantization(read_adapter_config(adapter_dir[0])) is None  # trained unquantized
    for q in (QuantizationConfig(), QuantizationConfig(bits=8), QuantizationConfig(type="fp4")):
        assert recorded_quantization(quantization_record(q)) == q
    assert quantization_record(None) == {"quantization": None}
    for bad in ({"bits": 3}, "nf4", {"bits": 4, "group": 64}):
        with pytest.raises(UserError, match="A/rlora_config.json: unreadable quantization record") as e:
            recorded_quantization({"quantization": bad}, "A/rlora_config.json")
        assert "save the adapter again" in e.value.fix


# ------------------------------------------------------------------------------- custom code


def test_custom_code_adapter_needs_the_flag(tiny_model_dir, tmp_path):
    model, tok = load_model(str(tiny_model_dir), dtype="float32")
    # A model class that transformers imported from the repository's own code.
    model.__class__ = type("CustomLlama", (LlamaForCausalLM,),
                           {"__module__": "transformers_modules.org.modeling"})
    inject_adapters(model, AdapterConfig(type="lora", r=2, target_modules=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    assert read_adapter_config(adapter)["trust_remote_code"] is True
    with pytest.raises(UserError, match="runs its own code") as e:
        load_with_adapter(None, str(adapter), dtype="float32")
    assert "--trust-remote-code" in e.value.fix
    lm, _, _ = load_with_adapter(None, str(adapter), dtype="float32", trust_remote_code=True)
    assert type(lm).__module__.startswith("transformers.")  # the flag only allows; this base has no code


def test_remote_code_refusal_of_an_unmarked_model_names_the_flag():
    e = _load_error("org/custom", ValueError("The repository org/custom contains custom code which must be "
                                             "executed... pass the argument `trust_remote_code=True`"))
    assert "own code" in e.problem and "--trust-remote-code" in e.fix
