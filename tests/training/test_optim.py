"""The optimizer's groups: weight decay on the factors only, and the gates' and routers' own
learning rates (adapter.gate_lr_ratio, router_lr_ratio); the schedule's warm-up (train.warmup_steps
or warmup_ratio) against its formula."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load

from rlora_cli.adapters import AdapterConfig, inject_adapters
from rlora_cli.config import TrainConfig
from rlora_cli.errors import UserError
from rlora_cli.training.optim import adamw, param_groups, warmup_steps


class _Train:
    learning_rate, weight_decay, lr_scheduler, warmup_ratio, warmup_steps = 1e-2, 0.1, "constant", 0.0, 0


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


def _lr(scheduler: str, step: int, total: int, warmup: int) -> float:
    """The schedule's multiplier of the peak learning rate at `step`, in float64."""
    if step < warmup:
        return step / warmup
    if scheduler == "constant":
        return 1.0
    done = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - done) if scheduler == "linear" else max(0.0, 0.5 * (1.0 + math.cos(math.pi * done)))


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup_steps, warmup_ratio, warmup", [(3, 0.5, 3), (0, 0.25, 3), (0, 0.0, 0)])
def test_lr_at_every_step_follows_the_formula(scheduler, warmup_steps, warmup_ratio, warmup):
    """warmup_steps > 0 wins over warmup_ratio (0.5 of 10 would be 5 steps); 0 falls back to
    ceil(ratio × total): 0.25 × 10 → 3."""
    train = TrainConfig(learning_rate=1e-2, lr_scheduler=scheduler, warmup_ratio=warmup_ratio,
                        warmup_steps=warmup_steps)
    total = 10
    optimizer, schedule = adamw(torch.nn.Linear(2, 2), train, total, fused=False)
    for step in range(total + 1):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * _lr(scheduler, step, total, warmup),
                                                                rel=1e-12, abs=1e-15), step
        optimizer.step()
        schedule.step()


def test_a_fixed_warmup_does_not_move_with_the_run_length():
    """The constant schedule's lr at each step is the same whatever max_steps is: what lets a run
    resumed with a larger max_steps continue as one planned that long."""
    def lrs(total: int) -> list[float]:
        train = TrainConfig(lr_scheduler="constant", warmup_steps=4)
        optimizer, schedule = adamw(torch.nn.Linear(2, 2), train, total, fused=False)
        out = []
        for _ in range(6):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return out

    assert lrs(6) == lrs(600) and lrs(6) == pytest.approx([0.0, 5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4], rel=1e-12)
    ratio = TrainConfig(lr_scheduler="constant", warmup_ratio=0.03)
    assert warmup_steps(ratio, 150) == 5 and warmup_steps(ratio, 600) == 18  # the ratio moves


def test_a_negative_warmup_is_refused():
    with pytest.raises(UserError) as e:
        TrainConfig(warmup_steps=-1)
    assert e.value.problems == ["train.warmup_steps: must be >= 0 (0 = use warmup_ratio), got -1"]
