"""The fused Triton path against a float64 formula: output and every gradient, every method.

Float32 operands; the kernels run in Triton's interpreter on the CPU (triton is not a project
dependency, so CI skips this file):

    PYTHONPATH=<triton site> TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 \
        python -m pytest -q -p no:cacheprovider tests/adapters/test_fused.py

Without the interpreter the same tests run on CUDA in float32. Odd sizes on purpose: no dimension
is a multiple of a tile, and n = 3 heads leave padded columns in every rank-space tile.
"""

from __future__ import annotations

import pytest
import torch
from fusedkit import CASES, case_id, float64, randomize, reference
from torch import nn

from rlora_cli.adapters import AdapterConfig, MultiHeadLoRA, layer_spec
from rlora_cli.adapters.probe import RouteProbe

pytest.importorskip("triton")
fused = pytest.importorskip("rlora_cli.adapters.fused")
if fused.K is None or not (fused.K.INTERPRETED or torch.cuda.is_available()):
    pytest.skip("needs TRITON_INTERPRET=1 (CPU) or CUDA", allow_module_level=True)

DEVICE = "cpu" if fused.K.INTERPRETED else "cuda"
T, D_IN, D_OUT = 37, 72, 96


def make_layer(case: dict, *, dropout: float = 0.0, bias: bool = True, seed: int = 0, d_in: int = D_IN,
               d_out: int = D_OUT) -> MultiHeadLoRA:
    torch.manual_seed(seed)
    case = dict(case)
    mixture = case.pop("mixture", False)
    cfg = AdapterConfig(**{"num_heads": 3, "r": 4, "lora_alpha": 8, **case, "lora_dropout": dropout})
    base = nn.Linear(d_in, d_out, bias=bias, device=DEVICE).requires_grad_(False)
    layer = randomize(MultiHeadLoRA(base, layer_spec(cfg)), 0.3)
    if mixture:
        layer.fixed_mixture = torch.tensor([0.5, 0.3, 0.2])
    return layer


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 2e-5) -> None:
    """Float32 against float64, relative to the tensor's largest entry."""
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach(), rtol=tol, atol=tol * scale)


def check(layer: MultiHeadLoRA, x: torch.Tensor, out: torch.Tensor, masks=(None, None)) -> None:
    """Output and the gradients of x and every trainable adapter tensor against the float64 formula."""
    t = float64(layer)
    x64 = x.detach().double().requires_grad_()
    ref = reference(layer, t, x64.reshape(-1, x.shape[-1]), *masks).reshape(out.shape)
    close(out, ref)
    names = [k for k, p in layer.named_parameters() if k.startswith("rlora_")]
    up = torch.randn(out.shape, dtype=torch.float64, device=DEVICE)
    got = torch.autograd.grad(out, [dict(layer.named_parameters())[k] for k in names] + [x], up.float(),
                              allow_unused=True)
    want = torch.autograd.grad(ref, [t[k] for k in names] + [x64], up, allow_unused=True)
    for name, g, w in zip(names + ["x"], got, want):
        if w is None:  # the router under a fixed mixture: eager autograd gives zeros, so must we
            assert name == "rlora_router" and not g.any(), name
            continue
        assert g.dtype == (x.dtype if name == "x" else dict(layer.named_parameters())[name].dtype)
        close(g, w)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_eval_forward_and_gradients_match_float64(case):
    layer = make_layer(case, dropout=0.3, bias=case["type"] != "lora").eval()  # eval: no dropout
    assert fused.supported(layer, torch.empty(1, D_IN, device=DEVICE)) is None
    x = torch.randn(T, D_IN, device=DEVICE, requires_grad=True)
    check(layer, x, fused.fused_forward(layer, x))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dropout_masks_replayed_exactly(case):
    """Train mode: the masks drawn in-kernel are the ones `dropout_masks` gives for the same seeds."""
    layer = make_layer(case, dropout=0.3).train()
    x = torch.randn(1, T, D_IN, device=DEVICE, requires_grad=True)  # a 3-D input too
    torch.manual_seed(11)
    out = fused.fused_forward(layer, x)
    torch.manual_seed(11)
    masks = fused.dropout_masks(layer, T, fused.draw_seeds(torch.device(DEVICE)))
    drawn = [m for m in masks if m is not None]
    assert len(drawn) == 1 and 0.5 < drawn[0].mean().item() < 0.9  # one dropout per method, p = 0.3
    check(layer, x, out, masks)


def test_masks_are_reproducible_and_independent_per_head():
    layer = make_layer(dict(type="rlora"), dropout=0.5).train()
    x = torch.randn(T, D_IN, device=DEVICE)
    torch.manual_seed(3)
    a = fused.fused_forward(layer, x)
    torch.manual_seed(3)
    torch.testing.assert_close(fused.fused_forward(layer, x), a, rtol=0, atol=0)
    assert not torch.equal(fused.fused_forward(layer, x), a)  # the generator moved on: new masks
    _, heads = fused.dropout_masks(layer, 512, fused.draw_seeds(torch.device(DEVICE)))
    assert heads.mean().item() == pytest.approx(0.5, abs=0.05)
    assert not torch.equal(heads[:, 0], heads[:, 1]) and not torch.equal(heads[:, 1], heads[:, 2])


def test_no_mask_and_no_dropped_input_is_saved():
    """Saved for backward: x itself (not a dropped copy), Z, H, the router's P, and weights."""
    layer = make_layer(dict(type="hydralora", random_init=True), dropout=0.2).train()
    x = torch.randn(T, D_IN, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fused.fused_forward(layer, x)
    per_token = [t for t in saved if t.dim() == 2 and t.shape[0] == T]
    assert sorted(t.shape[1] for t in per_token) == sorted([D_IN, 3 * 4 + 4, 4, 3])  # x, Z, H, P
    assert any(t.data_ptr() == x.data_ptr() and t.shape == x.shape for t in saved)  # x itself, no copy
    out.sum().backward()
    assert layer.rlora_A.grad is not None and x.grad is not None


@pytest.mark.parametrize("case", [dict(type="rlora"), dict(type="hydralora", random_init=True)], ids=case_id)
def test_unaligned_widths_take_the_pointer_path(case):
    """Rows of 70 and 90 floats do not start on 16 bytes: no tensor descriptors, masked loads instead."""
    layer = make_layer(case, dropout=0.2, d_in=70, d_out=90).train()
    x = torch.randn(T, 70, device=DEVICE, requires_grad=True)
    assert not fused._tma_ok(x) and not fused._tma_ok(layer.base.weight)
    torch.manual_seed(2)
    out = fused.fused_forward(layer, x)
    torch.manual_seed(2)
    check(layer, x, out, fused.dropout_masks(layer, T, fused.draw_seeds(torch.device(DEVICE))))


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gemm_lowrank_with_strided_operands_three_terms_and_a_mask(p, tma):
    """out = a·bᵀ + bias + Σ s·z·cᵀ with b = Wᵀ a view, one rank past a 64-wide chunk, term 0 masked;
    loaded through pointers and through tensor descriptors."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device=DEVICE)  # noqa: E731
    M, K, N = 37, 96, 72
    a, W, bias = rand(M, K), rand(K, N), rand(N)
    terms = [(rand(M, 70), rand(70, N).t(), 1.0), (rand(3, M).t(), rand(N, 3), 0.5),
             (rand(M, 5), rand(N, 5), -2.0)]
    seeds = torch.tensor([123, 0], device=DEVICE)
    out = fused.gemm_lowrank(a, W.t(), bias, tuple(terms), seeds=seeds, p=p, tma=tma)
    keep = fused._keep(seeds, M, N, p).double() / (1 - p) if p else 1.0
    d = lambda v: v.double()  # noqa: E731
    want = d(a) @ d(W) + d(bias) + sum(s * (d(z) @ d(c).t()) * (keep if i == 0 else 1.0)
                                       for i, (z, c, s) in enumerate(terms))
    close(out, want)


def test_unsupported_layers_say_why():
    layer = make_layer(dict(type="lora", num_heads=1))
    x = torch.randn(T, D_IN, device=DEVICE)
    for trainable in (layer.base.weight, layer.base.bias):
        trainable.requires_grad_(True)
        assert fused.supported(layer, x) == "base weight or bias is trainable"
        trainable.requires_grad_(False)
    assert fused.supported(layer, x) is None
    routed = make_layer(dict(type="rlora"))
    # a router loss needs ω with its gradient: the plain path
    routed.route_probe = RouteProbe([routed], 2, aux_weight=0.1)
    assert "router_aux_weight" in fused.supported(routed, x)
    assert "dtypes differ" in fused.supported(layer, x.double())
    assert "features" in fused.supported(layer, x[:, :-1])
    with pytest.raises(ValueError, match="cannot run here"):
        fused.fused_forward(layer, x.double())

    class Conv1D(nn.Module):  # a GPT-2-style base: weight stored [d_in, d_out]
        def __init__(self) -> None:
            super().__init__()
            self.nf = D_OUT
            self.weight = nn.Parameter(torch.zeros(D_IN, D_OUT, device=DEVICE), requires_grad=False)

    conv = MultiHeadLoRA(Conv1D(), layer.spec)
    assert fused.supported(conv, x) == "base is not a plain nn.Linear"


def test_route_probe_reads_the_same_router_weights_on_the_fused_path():
    """Router telemetry (no router loss) stays on with the fused path: the probe's sums equal the
    plain path's."""
    x = torch.randn(T, D_IN, device=DEVICE)
    tasks = torch.tensor([0] * 20 + [1] * 10 + [-1] * (T - 30), device=DEVICE)
    sums = []
    for use_fused in (False, True):
        layer = make_layer(dict(type="rlora")).train()
        probe = RouteProbe([layer], 2, device=DEVICE)
        layer.route_probe = probe
        assert fused.supported(layer, x) is None
        probe.start(tasks, tasks[:, None])
        (fused.fused_forward(layer, x) if use_fused else layer(x)).sum().backward()
        probe.stop()
        sums.append(probe.stats.clone())
    torch.testing.assert_close(sums[1], sums[0], rtol=1e-5, atol=1e-5)


def test_enable_switches_the_layers_that_can_and_names_the_others():
    plain, routed = make_layer(dict(type="lora", num_heads=1)), make_layer(dict(type="rlora"))
    routed.route_probe = RouteProbe([routed], 2, aux_weight=0.1)
    model = nn.ModuleList([plain, routed])
    on, never = fused.enable(model)
    assert on == 1 and plain.fused_forward is fused.maybe_forward and routed.fused_forward is None
    assert list(never.values()) == [1] and "router_aux_weight" in next(iter(never))
    assert fused.enable(model, on=False)[0] == 1 and plain.fused_forward is None
