"""The fused Triton path on CUDA: against the eager layer in the same dtypes and against float64.

    pytest -m gpu tests/adapters/test_fused_gpu.py       (on the GPU machine, with triton installed)

The matrix runs on fixed tiles (RLORA_FUSED_AUTOTUNE=0: one compile per kernel variant, no
tuning runs); the 1024×2048→8192 test runs autotuned. Errors are the largest absolute error
relative to the float64 tensor's largest entry:

    fp32 operands, no autocast    fused vs float64 ≤ 1e-5 (fp32 accumulate, 'highest' precision)
    bf16 autocast                 fused vs float64 ≤ 1.5 × eager's own error + 2e-3, and ≤ 3e-2;
                                  fused vs eager ≤ 3e-2 + eager's own error
    bf16 autocast, dropout on     fused vs float64 with the replayed masks ≤ 3e-2
"""

from __future__ import annotations

import pytest
import torch
from fusedkit import CASES, case_id, err, randomize, run_float64, trainable
from torch import nn

from rlora_cli.adapters import AdapterConfig, MultiHeadLoRA, layer_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("triton")
fused = pytest.importorskip("rlora_cli.adapters.fused")

BF16 = dict(bf16=3e-2, slack=2e-3, ratio=1.5)


@pytest.fixture
def fixed_tiles(monkeypatch):
    monkeypatch.setenv("RLORA_FUSED_AUTOTUNE", "0")


def make_layer(case: dict, d_in: int, d_out: int, *, base_dtype=torch.bfloat16, adapter_dtype=None,
               dropout: float = 0.0, heads: int = 3, r: int = 4) -> MultiHeadLoRA:
    torch.manual_seed(0)
    case = dict(case)
    mixture = case.pop("mixture", False)
    cfg = AdapterConfig(**{"num_heads": heads, "r": r, "lora_alpha": 2 * r, **case, "lora_dropout": dropout})
    base = nn.Linear(d_in, d_out, device="cuda", dtype=base_dtype).requires_grad_(False)
    # random values everywhere, scaled like trained adapters (ΔW ~ 0.1·W)
    layer = randomize(MultiHeadLoRA(base, layer_spec(cfg), dtype=adapter_dtype), d_in ** -0.5,
                      0.3 * d_in ** -0.5)
    if mixture:
        layer.fixed_mixture = torch.softmax(torch.randn(heads), 0)
    return layer


def run(layer, x, up, forward, autocast: bool):
    """Output and gradients (trainable adapter tensors, then x) of one forward and backward."""
    x = x.detach().requires_grad_()
    params = dict(layer.named_parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = forward(layer, x)
    grads = torch.autograd.grad(out, [params[k] for k in trainable(layer)] + [x], up.to(out.dtype),
                                allow_unused=True)
    return out, grads


def compare(name, fused_t, eager_t, ref_t, tol: dict) -> None:
    """No further from float64 than eager (within ratio and slack), under the cap; and from eager no
    further than the cap plus eager's own error."""
    e_f, e_e = err(fused_t, ref_t), err(eager_t, ref_t)
    assert fused_t.dtype == eager_t.dtype, name
    assert e_f <= tol["bf16"] and e_f <= tol["ratio"] * e_e + tol["slack"], (name, "fused", e_f, "eager", e_e)
    assert err(fused_t, eager_t.double()) <= tol["bf16"] + e_e, (name, err(fused_t, eager_t.double()), e_e)


@pytest.mark.parametrize("adapter_dtype", [None, torch.bfloat16], ids=["fp32-adapters", "bf16-adapters"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_autocast_matches_eager_and_float64(case, adapter_dtype, fixed_tiles):
    layer = make_layer(case, 520, 776, adapter_dtype=adapter_dtype).eval()
    x = torch.randn(300, 520, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(300, 776, device="cuda", dtype=torch.bfloat16)
    out_f, g_f = run(layer, x, up, fused.fused_forward, autocast=True)
    out_e, g_e = run(layer, x, up, lambda m, v: m(v), autocast=True)
    out_r, g_r = run_float64(layer, x, up)
    compare("out", out_f, out_e, out_r, BF16)
    for name, a, b, c in zip(trainable(layer) + ["x"], g_f, g_e, g_r):
        if c is None:
            assert not a.any() and not b.any(), name
        else:
            compare(name, a, b, c, BF16)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp32_without_autocast_matches_float64(case, fixed_tiles):
    layer = make_layer(case, 72, 96, base_dtype=torch.float32).eval()
    x = torch.randn(37, 72, device="cuda")
    up = torch.randn(37, 96, device="cuda")
    out_f, g_f = run(layer, x, up, fused.fused_forward, autocast=False)
    out_r, g_r = run_float64(layer, x, up)
    assert out_f.dtype == torch.float32 and err(out_f, out_r) <= 1e-5
    for name, a, c in zip(trainable(layer) + ["x"], g_f, g_r):
        assert err(a, c) <= 1e-5, (name, err(a, c))


def check_replayed_dropout(layer, tokens: int, seed: int) -> None:
    """bf16 autocast in train mode: the fused path's in-kernel masks, drawn again from the same
    seeds, give the float64 reference the same dropout, so output and gradients must agree."""
    x = torch.randn(tokens, layer.in_features, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(tokens, layer.out_features, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(seed)
    out_f, g_f = run(layer, x, up, fused.fused_forward, autocast=True)
    torch.manual_seed(seed)
    masks = fused.dropout_masks(layer, tokens, fused.draw_seeds(torch.device("cuda")))
    out_r, g_r = run_float64(layer, x, up, masks)
    assert err(out_f, out_r) <= BF16["bf16"]
    for name, a, c in zip(trainable(layer) + ["x"], g_f, g_r):
        assert err(a, c) <= BF16["bf16"], (name, err(a, c))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dropout_masks_replayed_under_autocast(case, fixed_tiles):
    check_replayed_dropout(make_layer(case, 520, 776, dropout=0.1).train(), 300, seed=5)


@pytest.mark.parametrize("method", ["rlora", "hydralora"])
def test_llama_mlp_shape_autotuned(method):
    """1024 tokens, 2048 → 8192, r = 8, n = 4, dropout on, fp32 adapters under bf16 autocast."""
    layer = make_layer(dict(type=method), 2048, 8192, dropout=0.05, heads=4, r=8).train()
    check_replayed_dropout(layer, 1024, seed=7)


def test_cpu_tensors_are_not_supported_without_the_interpreter():
    if fused.K.INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    spec = layer_spec(AdapterConfig(type="lora", num_heads=1))
    layer = MultiHeadLoRA(nn.Linear(8, 8).requires_grad_(False), spec)
    assert fused.supported(layer, torch.randn(2, 8)) == "not CUDA"
