"""train.kernels: what `auto` and `liger` do without a GPU, and the fused-loss plumbing of the
training loop, checked with linear_ce's plain-torch chunk in place of Liger's row kernel (the
Liger kernel itself is compared on the GPU: tests marked gpu)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import rlora_cli.training.kernels as kernels_mod
import rlora_cli.training.loop as train_mod
from rlora_cli.adapters import MultiHeadLoRA, fused
from rlora_cli.cli import main
from rlora_cli.data.packing import segment_bounds
from rlora_cli.errors import UserError
from rlora_cli.model import load_model
from rlora_cli.recipe.load import load_recipe
from rlora_cli.testing import metrics, write_recipe
from rlora_cli.training.kernels import Kernels, apply_kernels, install_fused_loss
from rlora_cli.training.loop import token_losses, train


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


def test_fused_adapters_fall_back_to_the_plain_path_and_the_banner_says_why(tmp_path, learnable_model_dir):
    """train.kernels: fused on the CPU: training runs the plain path and the note names the reason."""
    model, _ = load_model(str(learnable_model_dir), dtype="fp32")
    note = apply_kernels(model, "fused", torch.device("cpu")).note
    why = "triton is not installed" if fused.K is None else "no CUDA device"
    assert f"fused adapters off: {why} (plain path)" in note
    assert not any(m.fused_forward for m in model.modules() if isinstance(m, MultiHeadLoRA))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 2, "kernels": "fused"})
    console = Console(record=True, width=300)
    train(str(recipe), output=out, console=console)
    assert f"fused adapters off: {why} (plain path)" in console.export_text()
    assert [row["step"] for row in metrics(out) if "loss" in row][-1] == 2


def test_heads_the_fused_loss_cannot_run_are_named(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="fp32")
    assert kernels_mod._plain_head_problem(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in kernels_mod._plain_head_problem(model)


def test_fused_forward_gives_the_same_losses_and_gradients(tiny_model_dir):
    torch.manual_seed(0)
    plain, _ = load_model(str(tiny_model_dir), dtype="float64")
    fused, _ = load_model(str(tiny_model_dir), dtype="float64")
    install_fused_loss(fused)  # on the CPU: linear_ce's torch chunk
    batch = batch_of(plain)
    a = token_losses(plain, batch)
    b = token_losses(fused, batch, fused=True)
    assert a.shape == b.shape == (3, 11)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(b[0, :4].detach().abs().sum()) == 0.0  # unlabelled tokens count 0
    # Gradients reach the embeddings the same way (nothing in the model is trainable yet).
    for m in (plain, fused):
        m.get_input_embeddings().weight.requires_grad_(True)
    token_losses(plain, batch).sum().backward()
    token_losses(fused, batch, fused=True).sum().backward()
    torch.testing.assert_close(plain.get_input_embeddings().weight.grad,
                               fused.get_input_embeddings().weight.grad, rtol=1e-10, atol=1e-12)
    # Without labels it is the model's own forward (generation and evaluation need logits).
    torch.testing.assert_close(fused(input_ids=batch["input_ids"]).logits,
                               plain(input_ids=batch["input_ids"]).logits)


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_training_with_the_fused_loss_matches_the_plain_loop(tmp_path, learnable_model_dir, monkeypatch,
                                                              logging_steps):
    """Same per-step and per-task losses and adapter; the loss normalisation over accumulated
    micro-batches (prompt tokens masked) unchanged."""
    kw = dict(output={"logging_steps": logging_steps, "save_steps": 0})
    plain_dir, fused_dir = tmp_path / "plain", tmp_path / "fused"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train(write_recipe(tmp_path / "a", learnable_model_dir, **kw), output=plain_dir)

    def fused_kernels(model, kernels, device, **_):
        install_fused_loss(model)
        return Kernels("linear cross-entropy, torch chunks (test)", fused_loss=True)

    calls = []
    real = train_mod.token_losses

    def spy(model, batch, **kw):
        calls.append(kw)
        return real(model, batch, **kw)

    monkeypatch.setattr(train_mod, "apply_kernels", fused_kernels)
    monkeypatch.setattr(train_mod, "token_losses", spy)
    train(write_recipe(tmp_path / "b", learnable_model_dir, **kw), output=fused_dir)

    rows = {r["step"]: r for r in metrics(plain_dir) if "loss" in r}
    frows = {r["step"]: r for r in metrics(fused_dir) if "loss" in r}
    assert rows.keys() == frows.keys() == set(range(logging_steps, 7, logging_steps))
    for step in rows:
        assert frows[step]["loss"] == pytest.approx(rows[step]["loss"], rel=1e-5)
        assert frows[step]["input_tokens_per_s"] > frows[step]["tokens_per_s"] > 0  # prompts are inputs too
        assert set(frows[step]["task_loss"]) == {"facts", "reviews"}
        for task, value in rows[step]["task_loss"].items():
            assert frows[step]["task_loss"][task] == pytest.approx(value, rel=1e-5)
    # 6 steps × 2 micro-batches, then the final evaluation: 16 held-out rows in 4 batches.
    assert len(calls) == 12 + 4 and all(c["fused"] for c in calls)
    from safetensors.torch import load_file

    a = load_file(str(plain_dir / "adapter" / "rlora_adapter.safetensors"))
    b = load_file(str(fused_dir / "adapter" / "rlora_adapter.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    info = json.loads((fused_dir / "run_info.json").read_text())
    assert info["trainable_parameters"] > 0


def test_cli_liger_without_a_gpu_exits_2(tmp_path, learnable_model_dir, capsys):
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"kernels": "liger"})
    with pytest.raises(SystemExit) as e:
        main(["train", recipe, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "liger cannot be used: no CUDA device" in err and "Traceback" not in err


def test_adapter_dtype_bf16_trains_bf16_weights_and_bad_values_are_named(tmp_path, learnable_model_dir):
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 2, "adapter_dtype": "bf16"},
                          output={"save_steps": 0})
    out = train(recipe, output=tmp_path / "run")
    saved = load_file(str(out / "adapter" / "rlora_adapter.safetensors"))
    adapters = {t.dtype for k, t in saved.items() if "rlora_A0" not in k and "rlora_B0" not in k}
    assert adapters == {torch.bfloat16}
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)  # both steps logged, finite
    with pytest.raises(UserError, match="train.adapter_dtype"):
        load_recipe(recipe, ("train.adapter_dtype=fp8",))


# ----------------------------------------------------------------------------- packed attention


def packed_rows():
    """Two packed rows of 16: examples of 6 and 7 tokens + a 3-token pad tail; one of 16."""
    lengths = [[6, 7, 3], [16]]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 16), generator=g)
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    labels = ids.clone()
    labels[0, 13:] = -100
    labels[0, [0, 6]] = -100
    labels[1, 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):
    """torch's varlen_attn contract written per segment with sdpa ([T, H, D] in and out)."""
    assert tuple(window_size) == (-1, 0) and cu_q is cu_k and int(cu_q.diff().max()) <= max_q == max_k
    assert enable_gqa or k.shape[1] == q.shape[1]
    out = torch.zeros_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        if b > a:
            seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]
            out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale,
                                                      enable_gqa=enable_gqa).transpose(0, 1)
    return out


def test_segment_bounds_of_packed_and_unpacked_rows():
    b = packed_rows()
    cu = segment_bounds(b["position_ids"], (2, 16), bucket=8)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 6, 13, 16, 32, 32, 32, 32]
    assert segment_bounds(b["position_ids"], (2, 16)).shape == (64,)  # few shapes for the compiler
    assert segment_bounds(None, (3, 5), bucket=4).tolist() == [0, 5, 10, 15]  # one segment per row


@pytest.mark.parametrize("torch_gqa", ["", "flag", "op"])
def test_varlen_attention_equals_the_block_mask(tiny_model_dir, monkeypatch, torch_gqa):
    """The packed model's logits are the plain sdpa model's under transformers' block mask: through
    the written-out fallback (CPU), and through the varlen call (a per-segment stand-in for torch's
    kernel, which needs a GPU; the GPU tests run the real one), with keys and values repeated by
    hand, through varlen_attn's GQA flag, or through the op under it."""
    plain, _ = load_model(str(tiny_model_dir), dtype="fp32")
    packed, _ = load_model(str(tiny_model_dir), dtype="fp32")
    assert packed.config.num_key_value_heads < packed.config.num_attention_heads  # GQA is exercised
    assert kernels_mod.packed_attention(packed, torch.device("cpu"), 16) == "no CUDA device"
    assert kernels_mod.packed_attention(packed, torch.device("cuda"), 16) == ""  # nothing runs on it here
    assert packed.config._attn_implementation == kernels_mod.PACKED_ATTENTION
    b = packed_rows()
    want = plain(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    cu = segment_bounds(b["position_ids"], (2, 16), bucket=8)
    got = packed(input_ids=b["input_ids"], position_ids=b["position_ids"], rlora_cu_seq_lens=cu).logits
    torch.testing.assert_close(got, want)
    monkeypatch.setattr(kernels_mod, "_flash_ok", lambda q: True)
    monkeypatch.setattr(kernels_mod, "_VARLEN_GQA", torch_gqa)
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", reference_varlen)
    monkeypatch.setattr(torch.ops.torch_attn, "_varlen_attn",
                        lambda *a, **kw: (reference_varlen(*a, **kw, enable_gqa=True), None, None))
    got = packed(input_ids=b["input_ids"], position_ids=b["position_ids"], rlora_cu_seq_lens=cu).logits
    torch.testing.assert_close(got, want)
    # Without segment bounds (unpacked, right-padded rows): plain causal attention.
    mask = torch.ones(2, 16, dtype=torch.long)
    torch.testing.assert_close(packed(input_ids=b["input_ids"]).logits,
                               plain(input_ids=b["input_ids"], attention_mask=mask).logits)


def test_packed_attention_says_why_not(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="fp32")
    cuda = torch.device("cuda")
    model.config.sliding_window, model.config.use_sliding_window = 8, True
    assert kernels_mod.packed_attention(model, cuda, 16) == "sliding-window attention"
    model.config.sliding_window = 16  # a window no row reaches changes nothing
    model.config.attention_dropout = 0.1
    assert kernels_mod.packed_attention(model, cuda, 16) == "attention dropout"
    eager, _ = load_model(str(tiny_model_dir), dtype="fp32", attn_implementation="eager")
    assert kernels_mod.packed_attention(eager, cuda, 16) == "the model's attention is not sdpa"
    note = apply_kernels(model, "auto", torch.device("cpu"), packed_length=16).note
    assert "packed rows through the model's own attention (no CUDA device)" in note
    assert "packed" not in apply_kernels(model, "auto", torch.device("cpu")).note  # rows not packed


def test_training_with_packed_attention_matches_the_block_mask(tmp_path, learnable_model_dir, monkeypatch):
    """The loop hands every batch its segment bounds (training and held-out rows): same losses as
    the sdpa run, evaluation included (the model's attention forced on; on the CPU it computes
    the written-out block mask from the bounds)."""
    kw = dict(data={"packing": True}, adapter={"lora_dropout": 0.0},
              output={"logging_steps": 1, "save_steps": 0, "eval_steps": 3})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = train(write_recipe(tmp_path / "a", learnable_model_dir, **kw), output=tmp_path / "plain")
    seen = []

    def forced(model, kernels, device, **k):
        assert kernels_mod.packed_attention(model, torch.device("cuda"), k["packed_length"]) == ""
        return Kernels("varlen (test)", packed_attention=True)

    real = train_mod.token_losses

    def spy(model, batch, **k):
        seen.append("rlora_cu_seq_lens" in batch)
        return real(model, batch, **k)

    monkeypatch.setattr(train_mod, "apply_kernels", forced)
    monkeypatch.setattr(train_mod, "token_losses", spy)
    packed = train(write_recipe(tmp_path / "b", learnable_model_dir, **kw), output=tmp_path / "packed")
    assert seen and all(seen)
    a, b = metrics(plain), metrics(packed)
    losses = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
    held_out = [[v for r in m if "eval_loss" in r for v in r["eval_loss"].values()] for m in (a, b)]
    for x, y in (losses, held_out):
        assert x and len(x) == len(y)
        assert y == pytest.approx(x, rel=1e-5)
