"""train.kernels: what `auto` and `liger` do without a GPU, and the fused-loss plumbing of the
training loop, checked with a plain-torch linear cross-entropy in place of Liger's kernel (the
Liger kernel itself is compared on the GPU: tests marked gpu)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import rlora_cli.kernels as kernels_mod
import rlora_cli.train as train_mod
from rlora_cli.errors import UserError
from rlora_cli.kernels import Kernels, apply_kernels, install_fused_loss
from rlora_cli.model import load_model
from rlora_cli.train import token_losses, train

from test_train import metrics, write_recipe


def torch_linear_ce(hidden, weight, labels, reduction):
    """The fused loss's contract, computed the plain way (logits built)."""
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100, reduction=reduction)


def batch_of(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[2, 9:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_liger_ops_patch_this_model_and_leave_the_modeling_classes(tiny_model_dir, monkeypatch):
    """Liger rebinds names in the modeling file; a stand-in for its instance patch does the same.
    The classes go back (models built later stay plain), the RoPE function stays (this model
    looks it up at call time)."""
    import sys
    import types

    from transformers.models.llama import modeling_llama as home

    model, _ = load_model(str(tiny_model_dir), dtype="fp32")
    plain_norm, plain_rope = home.LlamaRMSNorm, home.apply_rotary_pos_emb

    def fake_rope(*args, **kwargs):
        return plain_rope(*args, **kwargs)

    def patch(model, **_):
        home.LlamaRMSNorm = type("FakeLigerRMSNorm", (plain_norm,), {})
        home.apply_rotary_pos_emb = fake_rope
        model.model.norm.patched = True

    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = patch
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(home, "apply_rotary_pos_emb", plain_rope)  # undone after the test
    kernels_mod._liger_ops(model)
    assert model.model.norm.patched
    assert home.LlamaRMSNorm is plain_norm and home.apply_rotary_pos_emb is fake_rope


def test_auto_says_why_liger_is_off_and_liger_is_a_user_error_on_cpu(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="fp32")
    assert apply_kernels(model, "none", torch.device("cpu")) == Kernels("none (train.kernels: none)")
    auto = apply_kernels(model, "auto", torch.device("cpu"))
    assert not auto.fused_loss and "no CUDA device" in auto.note
    with pytest.raises(UserError, match="liger cannot be used: no CUDA device") as e:
        apply_kernels(model, "liger", torch.device("cpu"))
    assert "kernels: auto or none" in e.value.fix


def test_heads_the_fused_loss_cannot_run_are_named(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="fp32")
    assert kernels_mod._plain_head_problem(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in kernels_mod._plain_head_problem(model)


def test_fused_forward_gives_the_same_losses_and_gradients(tiny_model_dir):
    torch.manual_seed(0)
    plain, _ = load_model(str(tiny_model_dir), dtype="float64")
    fused, _ = load_model(str(tiny_model_dir), dtype="float64")
    install_fused_loss(fused, torch_linear_ce)
    batch = batch_of(plain)
    a = token_losses(plain, batch)
    b = token_losses(fused, batch, fused=True)
    assert a.shape == b.shape == (3, 11)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(b[0, :4].detach().abs().sum()) == 0.0  # unlabelled tokens count 0
    total = token_losses(fused, batch, fused=True, per_token=False)
    assert total.dim() == 0
    torch.testing.assert_close(total, a.sum(), rtol=1e-6, atol=0)  # fp32 sums in another order
    # Gradients reach the embeddings the same way (nothing in the model is trainable yet).
    for m in (plain, fused):
        m.get_input_embeddings().weight.requires_grad_(True)
    token_losses(plain, batch).sum().backward()
    token_losses(fused, batch, fused=True, per_token=False).backward()
    torch.testing.assert_close(plain.get_input_embeddings().weight.grad, fused.get_input_embeddings().weight.grad,
                               rtol=1e-10, atol=1e-12)
    # Without labels it is the model's own forward (generation and evaluation need logits).
    torch.testing.assert_close(fused(input_ids=batch["input_ids"]).logits, plain(input_ids=batch["input_ids"]).logits)


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_training_with_the_fused_loss_matches_the_plain_loop(tmp_path, learnable_model_dir, monkeypatch, logging_steps):
    """Same per-step losses and adapter; per-task losses from the logged step only; the loss
    normalisation over accumulated micro-batches (prompt tokens masked) unchanged."""
    kw = dict(output={"logging_steps": logging_steps, "save_steps": 0})
    plain_dir, fused_dir = tmp_path / "plain", tmp_path / "fused"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train(write_recipe(tmp_path / "a", learnable_model_dir, **kw), output=plain_dir)

    def fused_kernels(model, kernels, device, **_):
        install_fused_loss(model, torch_linear_ce)
        return Kernels("torch linear cross-entropy (test)", fused_loss=True)

    calls = []
    real = train_mod.token_losses

    def spy(model, batch, **kw):
        calls.append(kw)
        return real(model, batch, **kw)

    monkeypatch.setattr(kernels_mod, "apply_kernels", fused_kernels)
    monkeypatch.setattr(train_mod, "token_losses", spy)
    train(write_recipe(tmp_path / "b", learnable_model_dir, **kw), output=fused_dir)

    rows = {r["step"]: r for r in metrics(plain_dir) if "loss" in r}
    frows = {r["step"]: r for r in metrics(fused_dir) if "loss" in r}
    assert rows.keys() == frows.keys() == set(range(logging_steps, 7, logging_steps))
    for step in rows:
        assert frows[step]["loss"] == pytest.approx(rows[step]["loss"], rel=1e-5)
        assert frows[step]["input_tokens_per_s"] > frows[step]["tokens_per_s"] > 0  # prompts are inputs too
        assert set(frows[step]["task_loss"]) == {"facts", "reviews"}
        if logging_steps == 1:  # every step logged: per-task losses agree too
            for task, value in rows[step]["task_loss"].items():
                assert frows[step]["task_loss"][task] == pytest.approx(value, rel=1e-5)
    train_calls = [c for c in calls if "per_token" in c]
    # 6 steps × 2 micro-batches; per-token losses only on logged steps.
    expected = [s % logging_steps == 0 for s in range(1, 7) for _ in range(2)]
    assert [c["per_token"] for c in train_calls] == expected
    assert all(c["fused"] for c in calls)
    from safetensors.torch import load_file

    a = load_file(str(plain_dir / "adapter" / "rlora_adapter.safetensors"))
    b = load_file(str(fused_dir / "adapter" / "rlora_adapter.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    info = json.loads((fused_dir / "run_info.json").read_text())
    assert info["trainable_parameters"] > 0


def test_cli_liger_without_a_gpu_exits_2(tmp_path, learnable_model_dir, capsys):
    from rlora_cli.cli import main

    recipe = write_recipe(tmp_path, learnable_model_dir, train={"kernels": "liger"})
    with pytest.raises(SystemExit) as e:
        main(["train", recipe, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "liger cannot be used: no CUDA device" in err and "Traceback" not in err


def test_adapter_dtype_bf16_trains_bf16_weights_and_bad_values_are_named(tmp_path, learnable_model_dir):
    from safetensors.torch import load_file

    from rlora_cli.config import load_recipe

    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 2, "adapter_dtype": "bf16"},
                          output={"save_steps": 0})
    out = train(recipe, output=tmp_path / "run")
    saved = load_file(str(out / "adapter" / "rlora_adapter.safetensors"))
    assert {t.dtype for k, t in saved.items() if "rlora_A0" not in k and "rlora_B0" not in k} == {torch.bfloat16}
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)  # both steps logged, finite
    with pytest.raises(UserError, match="train.adapter_dtype"):
        load_recipe(recipe, ("train.adapter_dtype=fp8",))
