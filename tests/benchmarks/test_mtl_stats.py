"""The multi-task benchmark's paired bootstrap (benchmarks/mtl/stats.py) against hand-made 0/1
vectors whose answer is known, and against a second, plain-Python implementation of the same
draws."""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.mtl import curves
from benchmarks.mtl.stats import paired_bootstrap
from rlora_cli.errors import UserError


def side(per_seed: dict[int, dict[str, list[int]]]) -> dict:
    """{seed: {task: record}} with keys naming each example by its task and place."""
    return {s: {t: {"correct": c, "example_keys": [f"{t}{i}" for i in range(len(c))]}
                for t, c in tasks.items()} for s, tasks in per_seed.items()}


def test_identical_methods_give_zero():
    rng = random.Random(0)
    a = side({s: {"x": [rng.randint(0, 1) for _ in range(30)], "y": [rng.randint(0, 1) for _ in range(7)]}
              for s in (0, 1, 2)})
    out = paired_bootstrap(a, a)
    assert out["diff"] == 0 and out["ci"] == [0.0, 0.0] and out["resolved"] is False
    assert out["seeds"] == [0, 1, 2] and out["replicates"] == 2000
    assert out["tasks"] == {t: {"diff": 0.0, "ci": [0.0, 0.0], "resolved": False} for t in ("x", "y")}


def test_a_difference_that_every_replicate_sees():
    # task x: A right and B wrong on every example (+1 whatever is drawn); task y: the same results.
    y = [1, 0, 0, 1, 1, 0]
    a = side({0: {"x": [1] * 5, "y": y}})
    b = side({0: {"x": [0] * 5, "y": y}})
    out = paired_bootstrap(a, b)
    assert out["diff"] == 0.5 and out["ci"] == [0.5, 0.5] and out["resolved"] is True
    assert out["tasks"]["x"]["ci"] == [1.0, 1.0] and out["tasks"]["y"]["ci"] == [0.0, 0.0]
    # a one-example difference among two: each replicate's mean is 0, 1/2 or 1 (p = 1/4, 1/2, 1/4)
    half = paired_bootstrap(side({0: {"x": [1, 0]}}), side({0: {"x": [0, 0]}}))
    assert half["diff"] == 0.5 and half["ci"] == [0.0, 1.0] and half["resolved"] is False


def test_pairs_within_each_seed():
    # seed 0: A beats B on every example; seed 1: they agree. Each replicate: (1 + 0) / 2.
    a = side({0: {"x": [1, 1, 1]}, 1: {"x": [0, 1, 0]}, 2: {"x": [1, 1, 1]}})
    b = side({0: {"x": [0, 0, 0]}, 1: {"x": [0, 1, 0]}})
    out = paired_bootstrap(a, b)
    assert out["seeds"] == [0, 1]  # seed 2 only on one side: left out
    assert out["diff"] == 0.5 and out["ci"] == [0.5, 0.5]
    # A's seeds swapped: the same mean difference, but no longer the same examples' results
    # side by side, so the replicates now vary
    swapped = paired_bootstrap(side({0: {"x": [0, 1, 0]}, 1: {"x": [1, 1, 1]}}), b)
    assert swapped["diff"] == pytest.approx(0.5) and swapped["ci"][0] < 0.5 < swapped["ci"][1]


def percentile(values: list[float], q: float) -> float:
    """numpy's default percentile: linear between the order statistics at q·(N−1)."""
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def test_matches_a_plain_python_bootstrap():
    rng = random.Random(1)
    sizes = {"x": 9, "y": 4, "z": 13}
    a = side({s: {t: [rng.randint(0, 1) for _ in range(n)] for t, n in sizes.items()} for s in (0, 3)})
    b = side({s: {t: [rng.randint(0, 1) for _ in range(n)] for t, n in sizes.items()} for s in (0, 3)})
    out = paired_bootstrap(a, b, replicates=300, seed=5)
    # the same draws, in the documented order, summed in plain Python
    g = torch.Generator().manual_seed(5)
    task_reps = {t: [0.0] * 300 for t in sizes}
    for s in (0, 3):
        for t, n in sizes.items():
            d = [x - y for x, y in zip(a[s][t]["correct"], b[s][t]["correct"])]
            idx = torch.randint(n, (300, n), generator=g).tolist()
            for r in range(300):
                task_reps[t][r] += sum(d[i] for i in idx[r]) / n / 2
    avg = [sum(task_reps[t][r] for t in sizes) / 3 for r in range(300)]
    assert out["ci"] == pytest.approx([percentile(avg, 0.025), percentile(avg, 0.975)], abs=1e-12)
    for t in sizes:
        assert out["tasks"][t]["ci"] == pytest.approx(
            [percentile(task_reps[t], 0.025), percentile(task_reps[t], 0.975)], abs=1e-12)
    observed = {t: sum(sum(a[s][t]["correct"]) - sum(b[s][t]["correct"]) for s in (0, 3)) / sizes[t] / 2
                for t in sizes}
    assert out["diff"] == pytest.approx(sum(observed.values()) / 3, abs=1e-12)
    assert paired_bootstrap(a, b, replicates=300, seed=5) == out  # seeded: the same again


def test_refuses_unpaired_results():
    a = side({0: {"x": [1, 0, 1]}})
    other = side({0: {"x": [1, 0, 1]}})
    other[0]["x"]["example_keys"] = ["x0", "x2", "x1"]
    with pytest.raises(UserError, match="different examples"):
        paired_bootstrap(a, other)
    with pytest.raises(UserError, match="only one side"):
        paired_bootstrap(a, side({0: {"x": [1, 0, 1], "y": [1]}}))
    with pytest.raises(UserError, match="share no seed"):
        paired_bootstrap(a, side({1: {"x": [1, 0, 1]}}))
    loss_only = {0: {"x": a[0]["x"], "talk": {"correct": None, "example_keys": ["t0"]}}}
    assert list(paired_bootstrap(loss_only, loss_only)["tasks"]) == ["x"]  # no accuracy: not compared


def test_curve_rows_take_the_shared_seeds_and_comparisons_every_pair():
    """A seed is a split: a table row over seeds 0-4 beside one over 0-2 would average other
    held-out sets, so the rows take the seeds all variants have; rlora − lora pairs all five."""
    def record(method: str, seed: int, right: int) -> dict:
        correct = [1] * right + [0] * (4 - right)
        return {"method": method, "seed": seed, "budget": 10, "trainable_parameters": 1,
                "mean_accuracy": right / 4, "train_loss": {"loss": 0.5},
                "tasks": {"t": {"accuracy": right / 4, "correct": correct,
                                "example_keys": [f"s{seed}e{i}" for i in range(4)]}}}

    records = ([record("lora", s, 1) for s in range(5)] + [record("rlora", s, 3) for s in range(5)]
               + [record("lora-matched", s, 2) for s in range(3)])
    summary = curves.budget_summary(records, ["t"], ["lora", "lora-matched", "rlora"], {}, replicates=50)
    assert summary["row_seeds"] == [0, 1, 2]
    assert all(row["seeds"] == [0, 1, 2] for row in summary["methods"].values())
    pairs = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    assert pairs[("rlora", "lora")]["seeds"] == [0, 1, 2, 3, 4] and pairs[("rlora", "lora")]["diff"] == 0.5
    assert pairs[("lora-matched", "lora")]["seeds"] == [0, 1, 2]
    assert summary["ordering"] == ["rlora", "lora-matched", "lora"]
