"""QLoRA: every method's adapter over a bitsandbytes 4-bit (and 8-bit) base, on the CPU backend.

bitsandbytes' CPU backend runs the quantized forward and backward, so all but speed is checked
here on the tiny model: the adapter over a 4-bit base against a float64 twin over the dequantized
weights W' (fp32 compute makes the base path exact), gradient checkpointing, `rlora train` in
4-bit, save/load over the recorded quantization, the merge's error against the 4-bit model +
adapter, the PEFT export, and the errors (exit 2, one line). Tests that need bitsandbytes skip
without it (pip install 'rlora[qlora]'); GPU tests (bf16 compute, CUDA kernels) are marked gpu.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import METHODS, cfg_for, mid, perturb, run_cli

from rlora_cli.adapters import adapter_layers, adapter_state, inject_adapters, merge_adapters
from rlora_cli.adapters.inject import base_dtype
from rlora_cli.checkpoint import load_adapter, save_adapter
from rlora_cli.config.model import QuantizationConfig
from rlora_cli.errors import UserError
from rlora_cli.model import load_model, load_with_adapter, quantization_record
from rlora_cli.quant import dequantize_model, dequantized_base, quantized_linears
from rlora_cli.testing import adapter_tensors, metrics, write_recipe

IDS = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
# fp32 compute: bitsandbytes' CPU matmul is then x·W'ᵀ in fp32, so the twin can be exact.
Q4 = QuantizationConfig(bits=4, compute_dtype="fp32")
Q4_BF16 = QuantizationConfig(bits=4, compute_dtype="bf16")  # what a GPU run computes in
Q8 = QuantizationConfig(bits=8)
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
# Gradients reach ~100 on the tiny model; fp32 sums then err by a few 1e-6 of a tensor's scale.
FP32_SCALE = 2e-5


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def learnable(learnable_model_dir) -> str:
    """The tiny model with a trained model's logit range (std ~0.8): errors read at that scale."""
    return str(learnable_model_dir)


def quantized(path, q=Q4, dtype="fp32"):
    return load_model(str(path), dtype=dtype, quantization=q)[0]


def twin(path, model, q=Q4, dtype="fp32"):
    """A float64 copy of `model` (loaded in `dtype`): the base quantized alike, dequantized to W'
    in float64, under the same adapter tensors; a plain-Linear base, which tests/adapters checks
    against the papers' formula."""
    plain = dequantize_model(quantized(path, q, dtype), torch.float64).double()
    inject_adapters(plain, model.rlora_config, init=False, dtype=torch.float64)
    with torch.no_grad():
        for name, tensor in adapter_state(plain).items():
            tensor.copy_(adapter_state(model)[name])
    return plain


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def run(model):
    """Logits on IDS, wherever the model is (a quantized base loads on CUDA when there is one)."""
    return model(IDS.to(device_of(model))).logits


def logits_and_grads(model, train: bool):
    """(logits, gradients of the trainable tensors) in train mode; (logits, {}) in eval mode,
    where bitsandbytes takes its inference kernel."""
    model.train(train)
    if not train:
        with torch.no_grad():
            return run(model).cpu(), {}
    out = run(model).cpu()
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad((out * up.to(out.dtype)).sum(), list(params.values()))
    return out.detach(), {n: g.double() for n, g in zip(params, grads)}


def maxdiff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_grads_close(grads: dict, ref_grads: dict) -> None:
    """Each gradient within fp32 rounding of its float64 reference, relative to the tensor's scale."""
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert maxdiff(g, ref_grads[name]) <= FP32_SCALE * ref_grads[name].abs().max().item(), name


# ------------------------------------------------------------------ the adapter over a quantized base


@pytest.mark.parametrize("method", METHODS, ids=mid)
def test_every_method_over_4bit_matches_a_float64_twin_on_the_dequantized_weights(bnb, tiny_model_dir,
                                                                                  method):
    model = quantized(tiny_model_dir)
    inject_adapters(model, cfg_for(method, lora_dropout=0.0))
    perturb(model)
    layer = adapter_layers(model)["model.layers.0.mlp.down_proj"]
    assert isinstance(layer.base, bnb.nn.Linear4bit) and len(quantized_linears(model)) == 14
    assert layer.rlora_A.dtype == torch.float32  # not the weight's storage dtype (uint8)
    assert base_dtype(model) == torch.float32    # what an adapter should record as base_dtype
    reference = twin(tiny_model_dir, model)
    for train in (False, True):  # eval, then train mode with its backward (dropout 0)
        out, grads = logits_and_grads(model, train)
        ref, ref_grads = logits_and_grads(reference, train)
        torch.testing.assert_close(out.double(), ref, **FP32_TOL)
        assert_grads_close(grads, ref_grads)


def test_8bit_trains_on_the_dequantized_weights_and_infers_close(bnb, learnable):
    """Training (dequantize, then a float matmul on the CPU) is exact; inference rounds the
    activations to int8 too (LLM.int8()), so it is only close."""
    model = quantized(learnable, Q8)
    inject_adapters(model, cfg_for(dict(type="rlora", router="off"), lora_dropout=0.0))
    perturb(model)
    assert isinstance(adapter_layers(model)["model.layers.0.mlp.down_proj"].base, bnb.nn.Linear8bitLt)
    _, grads = logits_and_grads(model, train=True)
    reference = twin(learnable, model, Q8)
    _, ref_grads = logits_and_grads(reference, train=True)
    assert_grads_close(grads, ref_grads)
    with torch.no_grad():
        quant, ref = run(model.eval()), run(reference.eval())
    gap = (quant.double() - ref).abs()
    print(f"8-bit + adapter (int8 activations) vs W' + adapter in float64: max {gap.max():.2e}, "
          f"mean {gap.mean():.2e}")
    assert 0 < gap.max() < 0.2 and gap.mean() < 0.02


def test_gradient_checkpointing_over_4bit_gives_the_same_gradients(bnb, tiny_model_dir):
    model = quantized(tiny_model_dir)
    inject_adapters(model, cfg_for(dict(type="rlora"), lora_dropout=0.0))
    perturb(model)
    plain = logits_and_grads(model, train=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    checkpointed = logits_and_grads(model, train=True)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    assert_grads_close(checkpointed[1], plain[1])


def test_merge_adapters_refuses_a_quantized_base(bnb, tiny_model_dir):
    model = quantized(tiny_model_dir)
    inject_adapters(model, cfg_for(dict(type="lora")))
    with pytest.raises(UserError, match="is quantized") as e:
        merge_adapters(model)
    assert "dequantize" in e.value.fix


# ------------------------------------------------------------------ training, saving, merging


def test_rlora_train_in_4bit_with_gradient_checkpointing(bnb, learnable, tmp_path):
    """Needs recipe/load.py to build `model.quantization` from a mapping (an override here)."""
    from rlora_cli.training.loop import train

    recipe = write_recipe(tmp_path, learnable, output={"save_steps": 0, "eval_steps": 0},
                          train={"max_steps": 4, "gradient_accumulation_steps": 1})
    out = train(recipe, ("model.quantization.bits=4", "train.gradient_checkpointing=true"),
                output=tmp_path / "run")
    losses = [row["loss"] for row in metrics(out) if "loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert {t.dtype for t in adapter_tensors(out).values()} == {torch.float32}
    saved = (out / "recipe.yaml").read_text()
    assert "quantization:" in saved and "bits: 4" in saved


@pytest.fixture(scope="module")
def qlora_adapter(bnb, learnable, tmp_path_factory):
    """A perturbed mergeable rlora adapter saved over the 4-bit base with its quantization
    record, and the 4-bit model + adapter's logits."""
    model = quantized(learnable)
    torch.manual_seed(0)
    inject_adapters(model, cfg_for(dict(type="rlora", router="off")))
    perturb(model)
    path = save_adapter(model, tmp_path_factory.mktemp("qlora") / "adapter", metadata=quantization_record(Q4))
    with torch.no_grad():
        return path, run(model.eval())


def test_adapter_loads_back_over_the_base_quantized_as_recorded(qlora_adapter):
    path, expected = qlora_adapter
    assert json.loads((path / "rlora_config.json").read_text())["quantization"] == {
        "bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "fp32"}
    model, _, _ = load_with_adapter(None, str(path), dtype="fp32")
    assert quantized_linears(model)
    with torch.no_grad():
        assert torch.equal(run(model), expected)


def test_merge_over_the_dequantized_base_reproduces_the_4bit_model(qlora_adapter, learnable, tmp_path):
    """merged W = W' + ΔW: with fp32 compute the 4-bit model + adapter is reproduced to fp32
    rounding; the merged folder is a plain model that reloads unquantized."""
    path, expected = qlora_adapter
    merged = merge_adapters(load_adapter(dequantized_base(learnable, Q4, "fp32"), path))
    assert not quantized_linears(merged) and not getattr(merged.config, "quantization_config", None)
    with torch.no_grad():
        gap = (run(merged) - expected).abs()
    unquantized = load_adapter(load_model(learnable, dtype="fp32")[0], path)  # the original W + ΔW
    with torch.no_grad():
        moved = (run(unquantized) - expected).abs()
    print(f"merged fp32 vs 4-bit (fp32 compute) + adapter: max {gap.max():.2e}, mean {gap.mean():.2e}; "
          f"the unquantized base + adapter: max {moved.max():.2e}, mean {moved.mean():.2e}")
    assert gap.max() <= 1e-4 and moved.mean() > 100 * gap.mean()  # W', not the original W
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = type(merged).from_pretrained(tmp_path / "merged").to(device_of(merged))
    assert not quantized_linears(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(run(reloaded), run(merged), rtol=0, atol=0)


def test_merge_error_under_bf16_compute(bnb, learnable, tmp_path):
    """What a GPU run sees: the 4-bit base computes in bf16, the merged model (W' + ΔW in bf16)
    too; both are within bf16 rounding of the exact float64 function."""
    model = quantized(learnable, Q4_BF16, dtype="bf16")
    torch.manual_seed(0)
    inject_adapters(model, cfg_for(dict(type="rlora", router="off")))
    perturb(model)
    path = save_adapter(model, tmp_path / "a", metadata=quantization_record(Q4_BF16))
    exact = twin(learnable, model, Q4_BF16, "bf16")
    merged = merge_adapters(load_adapter(dequantized_base(learnable, Q4_BF16, "bf16"), path))
    with torch.no_grad(), torch.autocast(device_of(model).type, dtype=torch.bfloat16):
        quant, fused = run(model.eval()).float(), run(merged).float()
    with torch.no_grad():
        ref = run(exact.eval())
    gaps = {"merged vs 4-bit + adapter": fused - quant, "4-bit + adapter vs float64": quant.double() - ref,
            "merged vs float64": fused.double() - ref}
    print("bf16: " + "; ".join(f"{k} max {v.abs().max():.2e} mean {v.abs().mean():.2e}"
                               for k, v in gaps.items()))
    # The merge adds nothing beyond bf16 arithmetic: it is no farther from the exact function.
    assert gaps["merged vs float64"].abs().mean() <= 1.5 * gaps["4-bit + adapter vs float64"].abs().mean()
    assert gaps["merged vs 4-bit + adapter"].abs().mean() < 0.05


def test_peft_export_does_not_depend_on_the_quantization(qlora_adapter, learnable, tmp_path):
    """The exported factors are the adapter's alone: PEFT over the dequantized base gives the
    rlora adapter's logits over that base."""
    from peft import PeftModel

    from rlora_cli.export import export_peft

    path, _ = qlora_adapter
    export_peft(path, tmp_path / "peft")
    peft = PeftModel.from_pretrained(dequantized_base(learnable, Q4, "fp32"), tmp_path / "peft")
    ours = load_adapter(dequantized_base(learnable, Q4, "fp32"), path)
    with torch.no_grad():
        torch.testing.assert_close(run(peft), run(ours), **FP32_TOL)


# ------------------------------------------------------------------ errors


def test_missing_bitsandbytes_is_one_user_error(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` finds absent
    with pytest.raises(UserError, match="needs bitsandbytes") as e:
        load_model(str(tiny_model_dir), quantization=Q4)
    assert e.value.fix.startswith("pip install 'rlora[qlora]'")


@pytest.mark.parametrize("override, key", [
    ("model.quantization.bits=3", "model.quantization.bits: must be 4 or 8"),
    ("model.quantization={bits: 8, type: nf4}", "model.quantization.type: applies to 4-bit only"),
    ("model.quantization.type=int4", "model.quantization.type: unknown value 'int4'"),
    ("model.quantization.compute_dtype=half", "model.quantization.compute_dtype: unknown value 'half'"),
])
def test_bad_quantization_keys_exit_2_naming_the_key(tiny_model_dir, tmp_path, capsys, override, key):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    assert run_cli(["train", recipe, override, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and "Traceback" not in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------ CUDA (the tests above run there too)


@pytest.mark.gpu
def test_gpu_bf16_qlora_steps_then_merge(bnb, learnable, tmp_path):
    """A QLoRA run as the trainer does it on a GPU (bf16 base and compute, fp32 adapters, bf16
    autocast, AdamW), then the merge into bf16: its logits against the 4-bit model + adapter."""
    assert torch.cuda.is_available()
    model = quantized(learnable, Q4_BF16, dtype="bf16")
    assert device_of(model).type == "cuda"
    inject_adapters(model, cfg_for(dict(type="rlora", router="off")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = IDS.cuda()
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.train()(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    path = save_adapter(model, tmp_path / "a", metadata=quantization_record(Q4_BF16))
    merged = merge_adapters(load_adapter(dequantized_base(learnable, Q4_BF16, "bf16"), path))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        gap = (run(merged).float() - run(model.eval()).float()).abs()
    print(f"GPU: merged bf16 vs 4-bit (bf16 compute) + adapter: max {gap.max():.2e}, mean {gap.mean():.2e}")
    assert gap.max() < 0.05
