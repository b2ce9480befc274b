"""The optimizer's groups: weight decay on the factors only, and the gates' and routers' own
learning rates (adapter.gate_lr_ratio, router_lr_ratio)."""

from __future__ import annotations

import pytest
import torch
from conftest import load

from rlora_cli.adapters import AdapterConfig, inject_adapters
from rlora_cli.errors import UserError
from rlora_cli.training.optim import adamw, param_groups


class _Train:
    learning_rate, weight_decay, lr_scheduler, warmup_ratio = 1e-2, 0.1, "constant", 0.0


def _model(tiny_model_dir, **adapter):
    model = load(tiny_model_dir)
    cfg = AdapterConfig(**adapter)
    inject_adapters(model, cfg)
    return model, cfg


@pytest.mark.parametrize("adapter, mixer, ratio", [
    ({"type": "multilora", "gate_lr_ratio": 20.0}, "rlora_gate", 20.0),
    ({"type": "rlora", "router_lr_ratio": 5.0}, "rlora_router", 5.0),
    ({"type": "lora"}, None, 1.0),
])
def test_groups_hold_factors_then_mixers_at_their_ratio(tiny_model_dir, adapter, mixer, ratio):
    model, cfg = _model(tiny_model_dir, **adapter)
    groups = param_groups(model, 0.1, 1e-3, gate_lr_ratio=cfg.gate_lr_ratio,
                          router_lr_ratio=cfg.router_lr_ratio)
    names = {id(p): n for n, p in model.named_parameters()}
    factors, mixers = ([names[id(p)] for p in g["params"]] for g in groups)
    assert len(groups) == 2  # always two: a checkpoint's optimizer state is matched group by group
    assert factors and all(n.endswith(("rlora_A", "rlora_B")) for n in factors)
    assert all(n.endswith(mixer) for n in mixers) and bool(mixers) == (mixer is not None)
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.1, 0.0)
    assert groups[1]["lr"] == pytest.approx(1e-3 * ratio) and groups[0]["lr"] == 1e-3


def test_first_adam_step_moves_gates_by_the_ratio(tiny_model_dir):
    """Adam's first update is lr · m/√v = ±lr per element (up to eps): the gates move ratio × lr."""
    model, cfg = _model(tiny_model_dir, type="multilora", gate_lr_ratio=20.0, lora_dropout=0.0)
    optimizer, _ = adamw(model, _Train(), total=10, fused=False, adapter=cfg)
    gates = [p for n, p in model.named_parameters() if n.endswith("rlora_gate")]
    before = [g.detach().clone() for g in gates]
    model(torch.randint(0, 400, (2, 12)), labels=torch.randint(0, 400, (2, 12))).loss.backward()
    optimizer.step()
    moved = torch.cat([(g - b).abs().flatten() for g, b in zip(gates, before)])
    moved = moved[moved > 0]
    assert moved.numel() > 0
    torch.testing.assert_close(moved, torch.full_like(moved, 20.0 * 1e-2), rtol=1e-3, atol=0)


@pytest.mark.parametrize("adapter, key", [
    ({"type": "rlora", "gate_lr_ratio": 2.0}, "adapter.gate_lr_ratio: applies to multilora"),
    ({"type": "rlora", "router": "off", "router_lr_ratio": 2.0},
     "adapter.router_lr_ratio: applies to hydralora"),
    ({"type": "multilora", "gate_lr_ratio": 0.0}, "adapter.gate_lr_ratio: must be a finite number > 0"),
    ({"type": "rlora", "router_lr_ratio": float("nan")}, "adapter.router_lr_ratio: must be a finite number"),
])
def test_ratios_are_checked(adapter, key):
    with pytest.raises(UserError) as e:
        AdapterConfig(**adapter)
    assert key in str(e.value)
