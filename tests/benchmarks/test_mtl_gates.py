"""MultiLoRA's gates in the learning curves: each budget file records their magnitudes, and the
report gathers them over seeds into a table of its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.mtl import curves, report_curves
from benchmarks.mtl.budgets import gate_summary
from rlora_cli.adapters import AdapterConfig, MultiHeadLoRA, layer_spec


def adapted(kind: str, gate_values: list[list[float]]) -> nn.Module:
    """A module holding one adapted Linear per row of gate values (ignored without scalar gates)."""
    spec = layer_spec(AdapterConfig(type=kind, num_heads=2, r=2))
    layers = nn.ModuleList(MultiHeadLoRA(nn.Linear(6, 5), spec) for _ in gate_values)
    for layer, values in zip(layers, gate_values):
        if spec.gate == "scalar":
            with torch.no_grad():
                layer.rlora_gate.copy_(torch.tensor(values))
    return layers


def test_gate_summary_reads_every_scalar_gate():
    summary = gate_summary(adapted("multilora", [[0.5, -0.25], [-1.5, 0.0]]))
    assert summary == {"modules": 2, "mean_abs": pytest.approx([1.0, 0.125]), "max_abs": pytest.approx(1.5)}
    assert gate_summary(adapted("rlora", [[0.0, 0.0]])) is None  # a router, no scalar gates
    untrained = gate_summary(adapted("multilora", [[0.0, 0.0]]))  # zero-init gates that never moved
    assert untrained["mean_abs"] == [0.0, 0.0] and untrained["max_abs"] == 0.0


def test_the_report_gathers_gates_over_seeds():
    def seed(budget: int, mean_abs: list[float], max_abs: float) -> dict:
        return {"method": "multilora", "budget": budget,
                "gates": {"modules": 3, "mean_abs": mean_abs, "max_abs": max_abs}}

    records = [seed(150, [0.1, 0.3], 0.5), seed(150, [0.3, 0.1], 0.9), {"method": "lora", "budget": 150},
               seed(300, [0.0, 0.0], 0.0)]
    gates = curves.gates(records, ["lora", "multilora"], [150, 300])
    assert list(gates) == ["multilora"]
    assert gates["multilora"]["150"] == {"mean_abs": pytest.approx([0.2, 0.2]), "max_abs": 0.9, "seeds": 2}
    assert gates["multilora"]["300"]["seeds"] == 1
    table = "\n".join(report_curves._gates_section(gates))
    assert "| multilora | 150 | 0.2 / 0.2 | 0.9 | 2 |" in table
    assert "| multilora | 300 | 0 / 0 | 0 | 1 |" in table
    assert report_curves._gates_section({}) == []
