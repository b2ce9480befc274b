"""Injection into real Hugging Face models, parameter counts and merge exactness (save/load:
tests/test_checkpoint.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import METHODS, cfg_for, load, mid, perturb  # noqa: E402
from transformers import AutoModelForCausalLM

from rlora_cli.adapters import (
    AdapterConfig,
    adapter_layers,
    find_targets,
    inject_adapters,
    merge_adapters,
    parameter_counts,
)
from rlora_cli.errors import UserError

MERGEABLE = [m for m in METHODS if m["type"] in ("lora", "multilora") or m.get("router") == "off"]




IDS = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", METHODS, ids=mid)
def test_injection_leaves_logits_unchanged(tiny_model_dir, method):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        model = load(tiny_model_dir, dtype)
        ref = model(IDS).logits
        inject_adapters(model, cfg_for(method))
        assert (model(IDS).logits - ref).abs().max().item() <= tol


@pytest.mark.parametrize("method", METHODS, ids=mid)
def test_only_adapters_train_and_counts_follow_the_formula(tiny_model_dir, method):
    model = load(tiny_model_dir)
    total_before = sum(p.numel() for p in model.parameters())
    cfg = cfg_for(method, target_modules=["gate_proj", "down_proj"])
    inject_adapters(model, cfg)
    trainable, total = parameter_counts(model)
    n, r = cfg.num_heads, cfg.r
    expected = 0
    for layer in adapter_layers(model).values():
        d_in, d_out = layer.in_features, layer.out_features
        expected += {
            "lora": r * (d_in + d_out),
            "multilora": n * r * (d_in + d_out) + n,
        }.get(cfg.type, r * d_in + n * r * d_out + (n * d_in if cfg.has_router else 0))
    assert trainable == expected and total == total_before + expected
    assert all(("rlora_" in name) == p.requires_grad for name, p in model.named_parameters())
    assert len(adapter_layers(model)) == 4  # 2 layers × {gate_proj, down_proj}


def test_target_matching_rules(tiny_model_dir):
    model = load(tiny_model_dir)
    assert len(find_targets(model, "all-linear")) == 14  # 7 per block × 2; lm_head excluded
    up = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert find_targets(model, ["mlp.up_proj"]) == up
    assert find_targets(model, r".*\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(UserError) as e:
        find_targets(model, ["c_attn"])
    assert "matches no Linear" in e.value.message and "gate_proj" in e.value.message
    with pytest.raises(UserError, match="not a valid regex"):
        find_targets(model, "(unclosed")


def test_injecting_twice_is_refused(tiny_model_dir):
    model = inject_adapters(load(tiny_model_dir), cfg_for(dict(type="lora")))
    with pytest.raises(UserError, match="already has rlora adapters"):
        inject_adapters(model, cfg_for(dict(type="lora")))


@pytest.mark.parametrize("method", MERGEABLE, ids=mid)
def test_merge_gives_a_plain_model_with_the_same_logits(tiny_model_dir, method):
    model = inject_adapters(load(tiny_model_dir, torch.float32), cfg_for(method))
    perturb(model)
    expected = model(IDS).logits
    merged = merge_adapters(model)
    assert not adapter_layers(merged)
    assert all(".base." not in name for name, _ in merged.named_parameters())
    assert (merged(IDS).logits - expected).abs().max().item() <= 1e-5
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGEABLE], ids=mid)
def test_merge_refuses_router_methods_and_changes_nothing(tiny_model_dir, method):
    model = inject_adapters(load(tiny_model_dir), cfg_for(method))
    perturb(model)
    expected = model(IDS).logits
    with pytest.raises(UserError, match="router"):
        merge_adapters(model)
    assert len(adapter_layers(model)) == 14 and torch.equal(model(IDS).logits, expected)


def _from_config(kind: str):
    from transformers import AutoConfig

    small = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if kind == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:
        config = AutoConfig.for_model(kind, intermediate_size=64, num_key_value_heads=2, **small)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


@pytest.mark.parametrize("kind, targets", [
    ("qwen2", ["q_proj", "v_proj", "gate_proj"]), ("mistral", "all-linear"), ("gpt2", ["c_attn", "c_fc"]),
])
def test_other_architectures_inject_train_and_merge(kind, targets):
    """Qwen2, Mistral and GPT-2 (Conv1D, weight stored [d_in, d_out]) all work end to end."""
    model = _from_config(kind)
    ids = torch.randint(0, 128, (2, 12))
    ref = model(ids).logits
    inject_adapters(model, cfg_for(dict(type="rlora", router="off"), target_modules=targets))
    assert (model(ids).logits - ref).abs().max().item() <= 1e-10
    perturb(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    expected = model(ids).logits
    merge_adapters(model)
    assert (model(ids).logits - expected).abs().max().item() <= 1e-10


def test_a_rank_past_a_layers_smallest_side_is_refused_before_anything_is_wrapped(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match=r"adapter.r: 100000 is larger than .*smallest dimension \(\d+\)"):
        inject_adapters(model, AdapterConfig(type="lora", r=100000, target_modules=["q_proj"]))
    assert not adapter_layers(model)
