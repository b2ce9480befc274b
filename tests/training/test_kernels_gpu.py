"""Liger in rlora's loop, on a CUDA device (run on the GPU machine: pytest -m gpu).

The fused linear cross-entropy must give the loss and gradients of the plain loss within bf16
noise, and the loop's normalisation (Σ token losses / label tokens of the whole step, prompt
tokens masked) must hold with it across gradient accumulation.
"""

from __future__ import annotations

import pytest
import torch

import rlora_cli.training.kernels as kernels_mod
import rlora_cli.training.linear_ce as linear_ce
from rlora_cli.adapters import AdapterConfig, inject_adapters
from rlora_cli.data.packing import segment_bounds
from rlora_cli.model import load_model
from rlora_cli.testing import metrics, write_recipe
from rlora_cli.training.kernels import apply_kernels, compile_model, packed_attention
from rlora_cli.training.linear_ce import liger_chunk, linear_cross_entropy, torch_chunk
from rlora_cli.training.loop import token_losses, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _unpatched_llama():
    """Liger's RoPE stays a global of the modeling file (the patched model looks it up at call
    time); `rlora train` applies it once per process, these tests many times: undo it each time."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for key, value in saved.items():
        if getattr(modeling_llama, key) is not value:
            setattr(modeling_llama, key, value)


def _batch(vocab: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, 48), generator=g)
    labels = ids.clone()
    labels[:, :16] = -100
    labels[3, 30:] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids, "labels": labels,
                                         "attention_mask": torch.ones_like(ids)}.items()}


def _model(path: str, kernels: str):
    torch.manual_seed(0)
    model, _ = load_model(path, dtype="bfloat16")
    model.to("cuda")
    inject_adapters(model, AdapterConfig(type="rlora", r=4, num_heads=2, lora_alpha=8, lora_dropout=0.0,
                                         target_modules="all-linear"))
    return model, apply_kernels(model, kernels, torch.device("cuda"))


def test_liger_loss_and_gradients_match_the_plain_loss(learnable_model_dir):
    plain, k0 = _model(str(learnable_model_dir), "none")
    liger, k1 = _model(str(learnable_model_dir), "liger")
    assert not k0.fused_loss and k1.fused_loss, k1.note
    batch = _batch(plain.config.vocab_size, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = token_losses(plain, batch)
        b = token_losses(liger, batch, fused=True)
    mask = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(b[mask], a[mask], rtol=2e-2, atol=2e-2)
    assert float(b[~mask].abs().sum()) == 0.0
    torch.testing.assert_close(b.sum(), a.sum(), rtol=1e-2, atol=0)
    a.sum().backward()
    b.sum().backward()
    grads = [(p.grad, q.grad) for (n, p), (_, q) in zip(plain.named_parameters(), liger.named_parameters())
             if p.requires_grad]
    assert grads
    for g0, g1 in grads:
        assert float((g1.float() - g0.float()).norm()) <= 0.05 * float(g0.float().norm()) + 1e-6


def test_training_with_liger_matches_training_without(tmp_path, learnable_model_dir):
    """Same recipe with kernels none / liger, and liger with 2 × 4 accumulation vs 1 × 8: the
    per-step losses agree within bf16 noise (prompt tokens masked; the step's token count
    normalises the sum over micro-batches of unequal label counts)."""
    runs = {}
    for name, train_keys in {"none": {"kernels": "none"}, "liger": {"kernels": "liger"},
                             "liger-1x8": {"kernels": "liger", "micro_batch_size": 8,
                                           "gradient_accumulation_steps": 1}}.items():
        (tmp_path / name).mkdir()
        recipe = write_recipe(tmp_path / name, learnable_model_dir,
                              model={"dtype": "bfloat16"},
                              adapter={"lora_dropout": 0.0},
                              train={"precision": "bf16", "max_steps": 6, **train_keys},
                              output={"save_steps": 0, "logging_steps": 1})
        out = train(recipe, output=tmp_path / name / "run")
        runs[name] = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(runs["none"]) == 6
    for name in ("liger", "liger-1x8"):
        for a, b in zip(runs["none"], runs[name]):
            assert b == pytest.approx(a, rel=3e-2), (name, runs)


def test_compiled_auto_takes_only_the_fused_loss(learnable_model_dir):
    """Under train.compile, auto leaves RoPE/RMSNorm/SwiGLU to the compiler (Liger's would break
    the compiled block) and keeps the fused cross-entropy; liger still takes everything."""
    torch.manual_seed(0)
    model, _ = load_model(str(learnable_model_dir), dtype="bfloat16")
    model.to("cuda")
    before = [(type(m), m.forward) for m in model.modules()]  # (earlier tests' Liger patches of the
    kern = apply_kernels(model, "auto", torch.device("cuda"), compiled=True)  # module stay in place)
    assert kern.fused_loss and "left to torch.compile" in kern.note
    assert [(type(m), m.forward) for m in model.modules()][1:] == before[1:]  # [0]: the new loss forward
    _, full = _model(str(learnable_model_dir), "liger")
    assert "RoPE" in full.note


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_matches_eager(tmp_path, learnable_model_dir, mode):
    """train.compile with kernels auto (compiled blocks, fused loss; CUDA graphs under
    reduce-overhead) follows the eager run's losses, evaluation in the middle of the run included."""
    runs = {}
    for name, train_keys in {"eager": {"kernels": "none"},
                             "compiled": {"kernels": "auto", "compile": True, "compile_mode": mode}}.items():
        (tmp_path / name).mkdir()
        recipe = write_recipe(tmp_path / name, learnable_model_dir, model={"dtype": "bfloat16"},
                              adapter={"lora_dropout": 0.0}, data={"packing": mode == "reduce-overhead"},
                              train={"precision": "bf16", "max_steps": 6, **train_keys},
                              output={"save_steps": 0, "logging_steps": 1, "eval_steps": 3})
        rows = metrics(train(recipe, output=tmp_path / name / "run"))
        runs[name] = ([r["loss"] for r in rows if "loss" in r],
                      [r["eval_loss"] for r in rows if "eval_loss" in r])
    (eager, eager_eval), (compiled, compiled_eval) = runs["eager"], runs["compiled"]
    assert len(eager) == len(compiled) == 6 and len(eager_eval) == len(compiled_eval) == 2
    for a, b in zip(eager + eager_eval, compiled + compiled_eval):
        assert b == pytest.approx(a, rel=3e-2), runs


@pytest.mark.parametrize("compiled", [False, True])
def test_varlen_attention_matches_the_block_mask(learnable_model_dir, compiled):
    """Packed rows through torch's varlen flash attention: the loss and gradients of sdpa under
    transformers' block mask, within bf16 noise, eager and inside compiled blocks."""
    g = torch.Generator().manual_seed(0)
    lengths = [[20, 17, 11], [48], [5, 30, 13], [40, 8]]
    ids = torch.randint(3, 500, (4, 48), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.tensor([[p for n in row for p in range(n)] for row in lengths])}
    batch["labels"][:, :4] = -100
    cu = segment_bounds(batch["position_ids"], (4, 48))
    batch = {k: v.to("cuda") for k, v in batch.items()}
    plain, _ = _model(str(learnable_model_dir), "none")
    packed, _ = _model(str(learnable_model_dir), "none")
    assert packed_attention(packed, torch.device("cuda"), 48) == ""
    if compiled:
        compile_model(packed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = token_losses(plain, batch)
        b = token_losses(packed, {**batch, "rlora_cu_seq_lens": cu.to("cuda")})
    torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
    a.sum().backward()
    b.sum().backward()
    grads = [(p.grad, q.grad) for p, q in zip(plain.parameters(), packed.parameters()) if p.requires_grad]
    assert grads
    for g0, g1 in grads:
        assert float((g1.float() - g0.float()).norm()) <= 0.05 * float(g0.float().norm()) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_chunk_matches_the_torch_chunk(dtype):
    """Liger's row kernel, called without a token count (reduction "sum"), writes the loss and
    logits gradient the plain-torch chunk writes; unlabelled rows get zeros."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(64, 50_000, device="cuda", generator=g)).to(dtype)
    labels = torch.randint(0, 50_000, (64,), device="cuda", generator=g)
    labels[::7] = -100
    out = []
    for fn in (torch_chunk, liger_chunk):
        x, losses = logits.clone(), torch.zeros(64, device="cuda")
        fn(x, labels, losses, True)
        out.append((x.float(), losses))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(out[1][1], out[0][1], **tol)
    torch.testing.assert_close(out[1][0], out[0][0], **tol)
    assert float(out[1][0][::7].abs().sum()) == 0.0 and float(out[1][1][::7].abs().sum()) == 0.0


def test_the_linear_cross_entropy_never_waits_for_the_gpu():
    """Forward and backward under CUDA's sync debug mode "error": any read of a device value on
    the host (Liger's own wrapper makes two a step) would raise here."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    weight = torch.randn(128_256, 256, device="cuda", dtype=torch.bfloat16, generator=g) / 16
    labels = torch.randint(0, 128_256, (4096,), device="cuda", generator=g)
    labels[:100] = -100
    linear_cross_entropy(hidden, weight, labels)  # Triton compiles the kernel (host work) first
    hidden.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy(hidden, weight, labels)
        (loss.sum() / 4000).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert linear_ce._liger_kernel() is not None  # Liger's row kernel ran, not the torch fallback
    h = hidden.detach().float().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(h @ weight.float().t(), labels, reduction="none")
    (want.sum() / 4000).backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=2e-2, atol=2e-2)
    assert float((hidden.grad.float() - h.grad).norm()) <= 0.02 * float(h.grad.norm())


def test_grouped_query_varlen_matches_repeated_heads(monkeypatch):
    """Fewer key/value heads handed to flash attention as they are (torch's GQA flag, or on torch
    2.11 the op under varlen_attn) give the outputs and gradients of keys and values repeated."""
    import inspect

    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 300, 301, 1024, 2048, 2048], dtype=torch.int32, device="cuda")
    leaves = [torch.randn(2048, h, 64, device="cuda", dtype=torch.bfloat16, generator=g) for h in (8, 2, 2)]
    results = []
    from torch.nn.attention.varlen import varlen_attn

    native = "flag" if "enable_gqa" in inspect.signature(varlen_attn).parameters else "op"
    for mode in ("", native):
        monkeypatch.setattr(kernels_mod, "_VARLEN_GQA", mode)
        q, k, v = (t.clone().requires_grad_(True) for t in leaves)
        out = kernels_mod._varlen(q, k, v, cu, 1024, None)
        out.float().square().sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
