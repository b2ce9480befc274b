"""The router probe against plain float64 formulas: entropy and per-task usage sums, the mutual
information and its gradient, what records nothing, and the probe inside compiled blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from rlora_cli.adapters import AdapterConfig, MultiHeadLoRA, inject_adapters, layer_spec
from rlora_cli.adapters.probe import install_probe, mutual_information
from rlora_cli.model import load_model

D, N_HEADS, N_TASKS = 12, 3, 3
# Two rows of 5 tokens: row 0 mixes tasks 0 and 2 (packed), row 1 is task 1 then padding. Task 2
# has 2 tokens; no task is absent, but the per-row case below leaves one out.
TASKS = torch.tensor([[0, 0, 2, 2, 0], [1, 1, 1, -1, -1]])


def routed_stack(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    """Two routed layers in a row, with random (non-uniform) routers and heads."""
    torch.manual_seed(seed)
    cfg = AdapterConfig(type="rlora", r=2, num_heads=N_HEADS, lora_dropout=0.0)
    layers = nn.Sequential(*(MultiHeadLoRA(nn.Linear(D, D, dtype=dtype), layer_spec(cfg)) for _ in range(2)))
    with torch.no_grad():
        for name, p in layers.named_parameters():
            if "rlora_" in name:
                p.normal_(0, 0.7)
    return layers.train()


def router_inputs(layers: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """ω [T, n] of each layer, in float64, from the inputs each one saw."""
    seen = []
    h = x
    for layer in layers:
        seen.append(torch.softmax(h.reshape(-1, D) @ layer.rlora_router.t(), -1).double().detach())
        h = layer(h)
    return seen


def reference_sums(omega: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """[tasks, n + 2]: Σ ω | Σ H(ω) | tokens per task, token by token."""
    out = torch.zeros(N_TASKS, N_HEADS + 2, dtype=torch.float64)
    for w, t in zip(omega, tasks.reshape(-1).tolist()):
        if t >= 0:
            out[t, :N_HEADS] += w
            out[t, N_HEADS] += -sum(float(p) * math.log(float(p)) for p in w)
            out[t, N_HEADS + 1] += 1
    return out


def reference_mi(omega: torch.Tensor, tasks: torch.Tensor) -> float:
    """I(T;E) = H(P(e)) − Σ_t P(t) H(P(·|t)) over the non-padding tokens."""
    tasks = tasks.reshape(-1)
    keep = tasks >= 0
    omega, tasks = omega[keep], tasks[keep]
    H = lambda p: -sum(float(v) * math.log(float(v)) for v in p if v > 0)  # noqa: E731
    conditional = sum(float((tasks == t).double().mean()) * H(omega[tasks == t].mean(0))
                      for t in tasks.unique().tolist())
    return H(omega.mean(0)) - conditional


@pytest.mark.parametrize("per_row", [False, True], ids=["per-token", "per-row"])
def test_sums_and_the_loss_match_the_float64_formulas(per_row):
    layers = routed_stack()
    probe = install_probe(layers, N_TASKS, aux_weight=0.3)
    tasks = torch.tensor([2, 0]) if per_row else TASKS  # per row: task 1 is absent
    token_tasks = tasks[:, None].expand(2, 5) if per_row else tasks
    x = torch.randn(2, 5, D, dtype=torch.float64)
    probe.start(tasks, x[..., 0])
    layers(x)
    aux = probe.stop()
    omegas = router_inputs(layers, x)
    expected = sum(reference_sums(w, token_tasks) for w in omegas)
    torch.testing.assert_close(probe.stats, expected, rtol=1e-12, atol=1e-12)
    mi = [reference_mi(w, token_tasks) for w in omegas]
    assert min(mi) > 1e-3  # the routers depend on the input, so on the task here
    assert float(aux.detach()) == pytest.approx(-0.3 * sum(mi) / 2, rel=1e-10)
    # the second form of I, from the joint distribution, on one layer directly
    flat = token_tasks.reshape(-1)
    index = torch.where(flat >= 0, flat, N_TASKS)  # padding: the row after the tasks
    counts = torch.bincount(index, minlength=N_TASKS + 1).double()
    direct = mutual_information(omegas[0], index, counts)
    assert float(direct) == pytest.approx(mi[0], rel=1e-10)
    probe.reset()
    assert not probe.stats.any()


def test_one_task_gives_zero_information():
    layers = routed_stack()
    probe = install_probe(layers, N_TASKS, aux_weight=1.0)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    probe.start(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, -1, -1]]), x[..., 0])
    layers(x)
    assert abs(float(probe.stop().detach())) < 1e-15


def test_the_loss_gradient_passes_gradcheck():
    """d(−w · mean I)/d(router weights), through the layers' own forward, in float64."""
    layers = routed_stack(seed=1)
    probe = install_probe(layers, N_TASKS, aux_weight=0.7)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    names = ["0.rlora_router", "1.rlora_router"]
    params = dict(layers.named_parameters())

    def aux(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
        probe.start(TASKS, x[..., 0])
        functional_call(layers, {**params, names[0]: r0, names[1]: r1}, (x,))
        return probe.stop()

    routers = [params[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(aux, routers, eps=1e-6, atol=1e-8)
    # and at a uniform router the gradient is exactly zero: I is at its minimum there
    zero = [torch.zeros_like(r, requires_grad=True) for r in routers]
    grads = torch.autograd.grad(aux(*zero), zero)
    assert all(float(g.abs().max()) < 1e-14 for g in grads)


def test_gradient_checkpointing_recomputes_the_loss_without_recording_twice():
    grads, stats = [], []
    for ckpt in (False, True):
        layers = routed_stack(seed=2)
        probe = install_probe(layers, N_TASKS, aux_weight=0.5)
        x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        probe.start(TASKS, x[..., 0])
        out = checkpoint(layers, x, use_reentrant=False) if ckpt else layers(x)
        (out.pow(2).mean() + probe.stop()).backward()
        grads.append([p.grad for p in layers.parameters() if p.requires_grad])
        stats.append(probe.stats.clone())
    torch.testing.assert_close(stats[1], stats[0], rtol=0, atol=0)  # the recomputation added nothing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_eval_no_grad_and_a_fixed_mixture_record_nothing():
    layers = routed_stack()
    probe = install_probe(layers, N_TASKS, aux_weight=1.0)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    for mode in ("eval", "no_grad", "fixed"):
        probe.start(TASKS, x[..., 0])
        if mode == "eval":
            layers.eval()(x)
        elif mode == "no_grad":
            with torch.no_grad():
                layers.train()(x)
        else:
            for layer in layers:
                layer.fixed_mixture = torch.ones(N_HEADS, dtype=torch.float64) / N_HEADS
            layers.train()(x)
        assert probe.stop() is None and not probe.stats.any(), mode
    for layer in layers:
        layer.fixed_mixture = None
    layers.train()(x)  # and outside start/stop: nothing either
    assert not probe.stats.any()


@pytest.mark.parametrize("case", [dict(type="lora", num_heads=1), dict(type="multilora"),
                                  dict(type="rlora", router="off")], ids=["lora", "multilora", "router-off"])
def test_no_probe_without_a_softmax_router(case):
    layer = MultiHeadLoRA(nn.Linear(D, D), layer_spec(AdapterConfig(**case)))
    assert install_probe(nn.Sequential(layer), N_TASKS) is None and layer.route_probe is None


def tiny_routed_model(model_dir, with_probe: bool):
    torch.manual_seed(0)
    model, _ = load_model(str(model_dir), dtype="fp32")
    inject_adapters(model, AdapterConfig(type="rlora", r=4, num_heads=3, lora_dropout=0.0, init="reference",
                                         target_modules="all-linear"))
    probe = install_probe(model, 2, aux_weight=0.5) if with_probe else None
    return model.train(), probe


def test_the_probe_compiles_into_one_graph_with_the_layers():
    """Two routed layers compiled as one region: one graph, no break, and the eager numbers.
    aot_eager runs the compiler's tracing and the functionalization of the in-place sums
    without building C++ kernels."""
    torch._dynamo.reset()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    runs = {}
    for compiled in (False, True):
        layers = routed_stack(seed=3)
        probe = install_probe(layers, N_TASKS, aux_weight=0.5)
        counter = CompileCounterWithBackend("aot_eager")
        run = torch.compile(layers, backend=counter) if compiled else layers
        for _ in range(2):
            probe.start(TASKS, x[..., 0])
            out = run(x)
            aux = probe.stop()
            (out.pow(2).mean() + aux).backward()
        grads = [p.grad for p in layers.parameters() if p.requires_grad]
        runs[compiled] = probe.stats.clone(), aux.detach(), grads
    assert counter.frame_count == 1  # the second call reused it
    probe.start(TASKS, x[..., 0])
    explained = torch._dynamo.explain(layers)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    for a, b in zip(runs[True][:2], runs[False][:2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(runs[True][2], runs[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compiled_blocks_trace_the_probe_without_a_graph_break(tiny_model_dir):
    """Regional compilation (each decoder block, as train.compile does) with the probe installed:
    as many graphs as without it (no break, no recompile per layer), and the same numbers as
    eager. aot_eager: see above (inductor, checked by hand, gives the same graph count)."""
    torch._dynamo.reset()
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    tasks = torch.tensor([[0] * 9, [1] * 6 + [-1] * 3])
    results, graphs = {}, {}
    for compiled, with_probe in ((False, True), (True, False), (True, True)):
        model, probe = tiny_routed_model(tiny_model_dir, with_probe)
        counter = CompileCounterWithBackend("aot_eager")
        if compiled:
            for block in model.model.layers:
                block.compile(backend=counter)
        for _ in range(2):
            if probe:
                probe.start(tasks, ids)
            logits = model(input_ids=ids).logits
            aux = probe.stop() if probe else 0.0
            (logits.pow(2).mean() + aux).backward()
        graphs[compiled, with_probe] = counter.frame_count
        if probe:
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results[compiled] = (probe.stats.clone(), float(aux.detach()), grads)
    assert graphs[True, True] == graphs[True, False] > 0
    (eager_stats, eager_aux, eager_grads), (stats, aux, grads) = results[False], results[True]
    assert eager_stats[:, -1].tolist() == [2 * 9 * 14, 2 * 6 * 14]  # 2 forwards × tokens × 14 modules
    torch.testing.assert_close(stats, eager_stats, rtol=1e-6, atol=1e-6)
    assert aux == pytest.approx(eager_aux, rel=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
