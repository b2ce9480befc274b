"""Router telemetry and the router loss in training: the metrics.jsonl fields, the step's
objective recomputed by hand in float64, weight 0 changing nothing, and `rlora analyze`'s plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator

import rlora_cli.training.loop as train_mod
from rlora_cli.adapters import AdapterConfig, adapter_layers, inject_adapters
from rlora_cli.adapters.probe import install_probe
from rlora_cli.analyze import analyze
from rlora_cli.errors import UserError
from rlora_cli.model import load_model
from rlora_cli.testing import adapter_tensors, metrics, write_recipe
from rlora_cli.training.kernels import Kernels
from rlora_cli.training.loop import Run, train
from rlora_cli.training.loss import token_losses
from rlora_cli.training.metrics import LogWindow

WEIGHT = 0.5


def rows_of(run):
    return [r for r in metrics(run) if "loss" in r]


def test_rows_carry_the_router_telemetry_and_analyze_plots_it(tmp_path, learnable_model_dir):
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 4, "learning_rate": 1e-2},
                          output={"logging_steps": 2, "save_steps": 0})
    run = train(recipe, output=tmp_path / "run")
    rows = rows_of(run)
    assert [r["step"] for r in rows] == [2, 4] and all("router_aux" not in r for r in rows)
    for r in rows:
        assert 0 < r["router_entropy"] <= math.log(2) + 1e-6  # two heads; H per token in float32
        assert set(r["task_router_usage"]) == {"facts", "reviews"}
        for usage in r["task_router_usage"].values():
            assert len(usage) == 2 and sum(usage) == pytest.approx(1.0, abs=1e-6)  # float32 ω
    assert rows[-1]["router_entropy"] < math.log(2)  # the zero-init routers have moved
    first, _ = analyze(run, output=tmp_path / "analysis")
    assert [h["step"] for h in first["router_training"]] == [2, 4]
    assert (tmp_path / "analysis" / "router_entropy.png").stat().st_size > 0
    saved = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert saved["router_training"][-1]["router_entropy"] == rows[-1]["router_entropy"]


def test_no_router_no_fields_and_no_plot(tmp_path, learnable_model_dir):
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 1},
                          adapter={"type": "rlora", "router": "off"}, output={"save_steps": 0})
    run = train(recipe, output=tmp_path / "run")
    row, = rows_of(run)
    assert not {"router_entropy", "task_router_usage", "router_aux"} & set(row)
    analyze(run, output=tmp_path / "analysis")
    assert not (tmp_path / "analysis" / "router_entropy.png").exists()
    with pytest.raises(UserError, match="adapter.router_aux_weight: the router loss needs a softmax router"):
        train(recipe, ("adapter.router_aux_weight=0.1",), output=tmp_path / "other")


def test_weight_0_trains_bit_identically_to_a_run_without_the_probe(tmp_path, learnable_model_dir,
                                                                       monkeypatch):
    runs = {}
    for probe in (True, False):
        if not probe:
            monkeypatch.setattr(train_mod, "install_probe", lambda *a, **k: None)
        (tmp_path / str(probe)).mkdir()
        recipe = write_recipe(tmp_path / str(probe), learnable_model_dir, train={"max_steps": 3},
                              output={"logging_steps": 1, "save_steps": 0})
        runs[probe] = train(recipe, output=tmp_path / str(probe) / "run")
    keep = ("step", "loss", "grad_norm", "tokens", "task_loss")
    with_probe, without = ([{k: r[k] for k in keep} for r in rows_of(runs[p])] for p in (True, False))
    assert with_probe == without and len(without) == 3
    assert all("router_entropy" in r for r in rows_of(runs[True]))
    a, b = adapter_tensors(runs[True]), adapter_tensors(runs[False])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_with_the_router_loss_logs_it(tmp_path, learnable_model_dir):
    recipe = write_recipe(tmp_path, learnable_model_dir, adapter={"router_aux_weight": WEIGHT},
                          train={"max_steps": 2}, output={"logging_steps": 1, "save_steps": 0})
    rows = rows_of(train(recipe, output=tmp_path / "run"))
    # ≤ 0: −weight · I with I ≥ 0 (step 1's zero-init routers are uniform: I = 0 up to rounding)
    assert len(rows) == 2 and all(-WEIGHT * math.log(2) <= r["router_aux"] <= 1e-12 for r in rows)
    assert rows[1]["router_aux"] < 0 and "router_entropy" in rows[1]


# ------------------------------------------------------------ the objective, recomputed by hand


def micro_batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches as collate writes them: a packed row mixing both tasks, a row of task 1
    padded on the right; then a row per task. Prompts are unlabelled."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, vocab, (2, 12), generator=g) for _ in range(2)]
    tasks = [torch.tensor([[0] * 5 + [1] * 7, [1] * 9 + [-1] * 3]), torch.tensor([[0] * 12, [1] * 12])]
    batches = []
    for i, t in zip(ids, tasks):
        labels = i.masked_fill(t < 0, -100)
        labels[:, :3] = -100
        batches.append({"input_ids": i, "labels": labels, "task_ids": t,
                        "attention_mask": (t >= 0).long()})
    return batches


def reference_mi(omega: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """I(T;E) = H(P(e)) − Σ_t P(t) H(P(·|t)) over the non-padding tokens, differentiable."""
    keep = tasks >= 0
    omega, tasks = omega[keep], tasks[keep]
    H = lambda p: -(p * p.log()).sum()  # noqa: E731
    return H(omega.mean(0)) - sum((tasks == t).double().mean() * H(omega[tasks == t].mean(0))
                                  for t in tasks.unique())


def reference_step(model, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ LM loss + Σ_mb label tokens · (−w · mean over modules of I), Σ of those router terms)
    for one step, from the routing weights each module computes on its own input (hooks)."""
    omegas = []
    hooks = [m.register_forward_hook(lambda m, a, out: omegas.append(m.router_weights(a[0]).reshape(-1, 3)))
             for m in adapter_layers(model).values()]
    total, aux_total = 0.0, 0.0
    for batch in micro:
        omegas.clear()
        loss = token_losses(model, batch).sum()
        mi = torch.stack([reference_mi(w, batch["task_ids"].reshape(-1)) for w in omegas]).mean()
        aux = -WEIGHT * mi * (batch["labels"][:, 1:] != -100).sum()
        total, aux_total = total + loss + aux, aux_total + aux.detach()
    for h in hooks:
        h.remove()
    return total, aux_total


def test_the_step_objective_is_the_lm_loss_plus_the_router_loss(learnable_model_dir):
    """The loop's forward-backward with the probe against a float64 recomputation by hand: the
    same gradients (so the objective is LM + aux with the LM loss's normalisation), the window's
    Σ aux·tokens, and the probe's sums against the hooks' routing weights."""
    torch.manual_seed(0)
    model, _ = load_model(str(learnable_model_dir), dtype="float64")
    # the released code's kaiming router: routing depends on the input from the start
    inject_adapters(model, AdapterConfig(type="rlora", r=4, num_heads=3, lora_dropout=0.0, init="reference",
                                         target_modules="all-linear"))
    probe = install_probe(model, 2, aux_weight=WEIGHT)
    accelerator = Accelerator(cpu=True)
    window = LogWindow(2, accelerator.device, every=1, probe=probe)
    run = Run(None, None, accelerator, None, None, None, model, probe, Kernels("none"), None, None, None, 0,
              False, None, None, log=None, clock=None, window=window, progress=None, meta={})
    micro = micro_batches(model.config.vocab_size)
    _, n_tokens = train_mod._forward_backward(run, micro)
    trained = [p for p in model.parameters() if p.requires_grad]
    loop_grads = [p.grad.clone() for p in trained]
    for layer in adapter_layers(model).values():
        layer.route_probe = None  # the recomputation sees plain layers
    objective, aux_total = reference_step(model, micro)
    reference_grads = torch.autograd.grad(objective / n_tokens, trained)
    assert float(aux_total) < -1e-4  # the router term is really there
    torch.testing.assert_close(window.aux, aux_total.reshape(1), rtol=1e-10, atol=0)
    for a, b in zip(loop_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the probe's token counts: 14 modules × each task's non-padding tokens of both micro-batches
    assert probe.stats[:, -1].tolist() == [14 * (5 + 12), 14 * (7 + 9 + 12)]
    usage = probe.stats[:, :3].sum(1) / probe.stats[:, -1]
    torch.testing.assert_close(usage, torch.ones(2, dtype=torch.float64))  # each ω sums to 1
