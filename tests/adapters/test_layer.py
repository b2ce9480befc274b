"""The fused layer against the papers' per-head loop, in float64, forward and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fusedkit import METHOD_CASES, case_id, tensors
from fusedkit import reference as formula
from torch import nn
from torch._inductor.utils import run_and_get_code

from rlora_cli.adapters import AdapterConfig, MultiHeadLoRA, layer_spec

D_IN, D_OUT, T = 24, 20, 10

# Every method × {router softmax/off} (× rslora on/off in the tests), plus R-LoRA's ablation switches.
CASES = [*METHOD_CASES, dict(type="hydralora", random_init=True, head_dropout=True)]


def make_layer(case: dict, *, rslora: bool = False, dropout: float = 0.0, bias: bool = True,
               seed: int = 0, dtype=torch.float64) -> MultiHeadLoRA:
    torch.manual_seed(seed)
    cfg = AdapterConfig(**{"num_heads": 3, "r": 4, "lora_alpha": 8, **case,
                           "lora_dropout": dropout, "use_rslora": rslora})
    base = nn.Linear(D_IN, D_OUT, bias=bias, dtype=dtype)
    layer = MultiHeadLoRA(base, layer_spec(cfg))
    with torch.no_grad():  # random values everywhere, so no term hides behind a zero init
        for name, p in layer.named_parameters():
            if name.startswith("rlora_"):
                p.normal_(0, 0.5)
    return layer


def reference(layer: MultiHeadLoRA, x: torch.Tensor, in_mask=None, head_masks=None) -> torch.Tensor:
    """fusedkit's per-head formula on the layer's own float64 tensors; the masks as F.dropout draws
    them (kept entries scaled by 1/(1 − p)), so only where they are zero matters."""
    def kept(mask):
        return None if mask is None else mask != 0

    return formula(layer, tensors(layer), x, kept(in_mask), kept(head_masks))


def grads(out: torch.Tensor, tensors: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, upstream))


@pytest.mark.parametrize("compiled_path", [False, True], ids=["in-place", "add"])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_reference(case, rslora, compiled_path, monkeypatch):
    """Both ways of adding the delta: eager's in-place GEMM and the plain add taken under torch.compile."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiled_path)
    layer = make_layer(case, rslora=rslora).eval()
    x = torch.randn(T, D_IN, dtype=torch.float64, requires_grad=True)
    out, ref = layer(x), reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = [p for n, p in layer.named_parameters() if n.startswith("rlora_")] + [x]
    up = torch.randn_like(out)
    for g, g_ref in zip(grads(out, params, up), grads(ref, params, up)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compiled_path", [False, True], ids=["in-place", "add"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dropout_masks_match_reference(case, compiled_path, monkeypatch):
    """Train mode: same RNG stream → same masks; input masks (shared) or per-head masks. A 3-D
    input, whose delta the compiled path adds in the output's own shape."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiled_path)
    p = 0.3
    layer = make_layer(case, dropout=p).train()
    x = torch.randn(2, T // 2, D_IN, dtype=torch.float64, requires_grad=True)  # 3-D input too
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    spec, flat = layer.spec, x.reshape(T, D_IN)
    ones = torch.ones(T, spec.num_heads, spec.r, dtype=x.dtype)
    in_mask = F.dropout(torch.ones_like(flat), p, True) if spec.input_dropout else None
    head_masks = F.dropout(ones, p, True) if spec.head_dropout else None
    ref = reference(layer, flat, in_mask, head_masks).reshape(2, T // 2, D_OUT)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = [p for n, p in layer.named_parameters() if n.startswith("rlora_")] + [x]
    up = torch.randn_like(out)
    for g, g_ref in zip(grads(out, params, up), grads(ref, params, up)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_rlora_masks_differ_per_head():
    layer = make_layer(dict(type="rlora"), dropout=0.5).train()
    z, _ = layer._rank_space(torch.randn(64, D_IN, dtype=torch.float64))
    dropped = z[:, : 3 * 4].view(64, 3, 4) == 0  # the heads; then the compensation block
    assert dropped.float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert not torch.equal(dropped[:, 0], dropped[:, 1]) and not torch.equal(dropped[:, 1], dropped[:, 2])


def test_nothing_of_size_t_n_dout_is_built():
    """Rank space only: the largest activation saved for backward is at most T×max(d_in, d_out)."""
    d_in, d_out, t, n = 32, 48, 16, 8
    cfg = AdapterConfig(type="rlora", r=2, num_heads=n, lora_dropout=0.1)
    layer = MultiHeadLoRA(nn.Linear(d_in, d_out), layer_spec(cfg)).train()
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tt: sizes.append(tt.numel()) or tt, lambda tt: tt):
        layer(torch.randn(t, d_in)).sum().backward()
    assert max(sizes) < t * n * d_out
    assert max(sizes) <= max(t * max(d_in, d_out), d_out * (n + 1) * cfg.r)  # [B_cat | B0] is saved


def std(t: torch.Tensor) -> float:
    return t.double().std().item()


def test_rlora_paper_init_scale_and_zero_delta():
    d_in, d_out, r, n = 512, 1024, 8, 4
    torch.manual_seed(0)
    cfg = AdapterConfig(type="rlora", r=r, num_heads=n, lora_dropout=0.0)
    layer = MultiHeadLoRA(nn.Linear(d_in, d_out, dtype=torch.float64), layer_spec(cfg)).eval()
    c = d_out ** 0.25 / math.sqrt(64)
    assert std(layer.rlora_A) == pytest.approx(c / math.sqrt(d_in), rel=0.05)
    assert std(layer.rlora_B) == pytest.approx(c / math.sqrt(d_out), rel=0.03)
    heads = layer.rlora_B.view(d_out, n, r)
    assert not torch.allclose(heads[:, 0], heads[:, 1])  # independent random heads
    assert torch.count_nonzero(layer.rlora_router) == 0  # ω ≡ 1/n at start
    x = torch.randn(32, d_in, dtype=torch.float64)
    assert (layer(x) - layer.base(x)).abs().max().item() <= 1e-10


def test_rlora_reference_init_differs_from_paper():
    d_in, d_out, r, n = 512, 1024, 8, 3
    layers = {}
    for init in ("paper", "reference"):
        torch.manual_seed(0)
        cfg = AdapterConfig(type="rlora", r=r, num_heads=n, init=init)
        layers[init] = MultiHeadLoRA(nn.Linear(d_in, d_out, dtype=torch.float64), layer_spec(cfg))
    ref = layers["reference"]
    c = r ** 0.25 / math.sqrt(64)
    assert std(ref.rlora_A) == pytest.approx(c ** n / math.sqrt(d_in), rel=0.05)
    heads = ref.rlora_B.view(d_out, n, r)
    for i in range(n):  # zero-based head i is scaled by c^(n-i)
        assert std(heads[:, i]) == pytest.approx(c ** (n - i) / math.sqrt(d_out), rel=0.06)
    assert torch.count_nonzero(ref.rlora_router) > 0  # the released code keeps a kaiming router
    assert std(layers["paper"].rlora_A) / std(ref.rlora_A) > 2


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_delta_at_init_without_perturbation(case):
    torch.manual_seed(1)
    cfg = AdapterConfig(**{"num_heads": 3, "r": 4, **case})
    layer = MultiHeadLoRA(nn.Linear(D_IN, D_OUT, dtype=torch.float64), layer_spec(cfg)).eval()
    x = torch.randn(T, D_IN, dtype=torch.float64)
    delta = (layer(x) - layer.base(x)).abs().max().item()
    if case.get("init") == "reference":
        assert delta > 0  # the released code's kaiming router breaks the exact cancellation
    else:
        assert delta <= 1e-10


@pytest.mark.parametrize("case", [c for c in CASES
                                  if c.get("router") == "off" or c["type"] in ("lora", "multilora")],
                         ids=case_id)
def test_static_factors_equal_the_layer_delta(case):
    layer = make_layer(case).eval()
    x = torch.randn(T, D_IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x) - layer.base(x), x @ layer.delta_weight().t(), rtol=1e-11, atol=1e-11)


def test_router_softmax_runs_in_float32_for_half_inputs():
    layer = make_layer(dict(type="hydralora"), dtype=torch.float32)
    omega = layer.router_weights(torch.randn(5, D_IN).to(torch.bfloat16))
    assert omega.dtype == torch.float32
    torch.testing.assert_close(omega.sum(-1), torch.ones(5))


@pytest.mark.parametrize("bad, key", [
    (dict(r=0), "adapter.r"), (dict(r=-2), "adapter.r"), (dict(num_heads=0), "adapter.num_heads"),
    (dict(lora_dropout=1.0), "adapter.lora_dropout"), (dict(lora_dropout=-0.1), "adapter.lora_dropout"),
    (dict(type="dora"), "adapter.type"), (dict(type="lora", num_heads=2), "adapter.num_heads"),
    (dict(type="lora", router="off"), "adapter.router"), (dict(router="topk"), "adapter.router"),
])
def test_bad_adapter_config_is_one_clear_error(bad, key):
    from rlora_cli.errors import UserError

    with pytest.raises(UserError) as e:
        AdapterConfig(**bad)
    assert key in e.value.message and "\n" not in e.value.problem


# ------------------------------------------------------------------ a fixed head mixture (per-task folds)

ROUTED = [c for c in CASES if c["type"] in ("hydralora", "rlora") and c.get("router") != "off"]


def fold_reference(layer: MultiHeadLoRA, mixture: torch.Tensor) -> torch.Tensor:
    """ΔW of the fixed mixture in float64, head by head: s·Σ_i w_i·B_i·A (− s·B0·A0)."""
    spec, r, s = layer.spec, layer.spec.r, layer.spec.scaling
    delta = sum(s * mixture[i] * layer.rlora_B[:, i * r:(i + 1) * r] @ layer.rlora_A
                for i in range(spec.num_heads))
    if spec.compensate:
        delta = delta - s * layer.rlora_B0 @ layer.rlora_A0
    return delta.detach()


@pytest.mark.parametrize("case", ROUTED, ids=case_id)
def test_static_factors_of_a_mixture_match_the_float64_formula_and_the_fixed_layer(case):
    layer = make_layer(case).eval()
    mixture = torch.softmax(torch.randn(3, dtype=torch.float64), 0)
    B, A = layer.static_factors(mixture)
    rank = 2 * 4 if layer.spec.compensate else 4  # A is shared: one rank-r head, plus R-LoRA's block
    assert B.shape == (D_OUT, rank) and A.shape == (rank, D_IN)
    torch.testing.assert_close(B @ A, fold_reference(layer, mixture), rtol=1e-12, atol=1e-12)
    # the layer with its router replaced by the same fixed weights computes exactly that ΔW
    x = torch.randn(T, D_IN, dtype=torch.float64)
    routed = layer(x)
    layer.fixed_mixture = mixture
    torch.testing.assert_close(layer(x) - layer.base(x), x @ (B @ A).t(), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(layer.delta_weight(), B @ A)  # no argument: the fixed mixture
    torch.testing.assert_close(layer.router_weights(x), mixture.expand(T, 3))
    assert not torch.allclose(layer(x), routed)  # the fixed mixture really replaced the router
    assert not any("fixed" in k for k in layer.state_dict())  # never part of the saved adapter
    layer.fixed_mixture = None
    torch.testing.assert_close(layer(x), routed, rtol=0, atol=0)


def test_a_router_without_a_mixture_still_raises_and_a_static_gate_takes_none():
    from rlora_cli.errors import UserError

    with pytest.raises(UserError, match="softmax router") as e:
        make_layer(dict(type="rlora")).static_factors()
    assert "--task" in e.value.fix and "adapter.router=off" in e.value.fix
    with pytest.raises(ValueError, match="head mixture"):
        make_layer(dict(type="hydralora", router="off")).static_factors(torch.ones(3) / 3)
    with pytest.raises(ValueError, match="3 finite weights"):
        make_layer(dict(type="hydralora")).static_factors(torch.ones(2) / 2)
    # the uniform mixture folds a softmax router to what router: off computes from the same heads
    routed, off = make_layer(dict(type="rlora")), make_layer(dict(type="rlora", router="off"))
    uniform = torch.ones(3, dtype=torch.float64) / 3
    torch.testing.assert_close(routed.delta_weight(uniform), off.delta_weight())


@pytest.mark.slow
def test_compiled_forward_adds_the_delta_without_an_addmm():
    """Inductor rewrites a sum of two 2-D matmuls into an out-of-place addmm, which copies its input
    first; added in the output's 3-D shape the delta's sum fuses into the next kernel instead, as
    PEFT's does. The forward's generated code (CPU inductor) runs plain matmuls and no addmm."""
    torch._dynamo.reset()
    layer = make_layer(dict(type="rlora"), bias=False, dtype=torch.float32).eval()  # no bias: its addmm
    x = torch.randn(2, T // 2, D_IN, requires_grad=True)
    fn = torch.compile(lambda x: layer(x).pow(2).mean())
    out, (code, *_) = run_and_get_code(fn, x)  # the forward's code first
    torch.testing.assert_close(out, layer(x).pow(2).mean(), rtol=1e-5, atol=1e-5)
    calls = code[code.index("def call("):]
    assert "extern_kernels.mm(" in calls and "addmm" not in calls

