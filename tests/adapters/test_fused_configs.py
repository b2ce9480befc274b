"""Every Hopper tile config of every fused kernel, and the autotuner's way of running them, against
the float64 formula: forward and every gradient, train mode with the dropout masks replayed.

The plain tests run each kernel on one tile choice (the interpreter's small tiles, or the GPU's
fixed config); the autotuner may pick any of `configs`. Here each config is forced in turn, and a
real triton.autotune over all of them (every config run once, then the winner launched again, its
pre_hook setting the descriptors' tiles) gives the same answer.

    PYTHONPATH=<triton site> TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 \
        python -m pytest -q -p no:cacheprovider -m "slow or not slow" tests/adapters/test_fused_configs.py

The interpreter runs fp32 (tolerance 2e-5 of each tensor's largest entry) and skips configs that
differ only in warps and stages; on CUDA every config runs under bf16 autocast (tolerance 3e-2, as
test_fused_gpu.py), and `-m gpu` adds the Llama MLP shape of its autotuned test. Outputs are
allocated NaN-filled, so an element a config leaves unwritten shows as a NaN error.
"""

from __future__ import annotations

import pytest
import torch
from fusedkit import case_id, err, randomize, run_float64, trainable
from torch import nn

from rlora_cli.adapters import AdapterConfig, MultiHeadLoRA, layer_spec

triton = pytest.importorskip("triton")
fused = pytest.importorskip("rlora_cli.adapters.fused")
if fused.K is None or not (fused.K.INTERPRETED or torch.cuda.is_available()):
    pytest.skip("needs TRITON_INTERPRET=1 (CPU) or CUDA", allow_module_level=True)

K = fused.K
INTERP = K.INTERPRETED
DEVICE = "cpu" if INTERP else "cuda"
TOL = 2e-5 if INTERP else 3e-2
KERNELS = ("GEMM", "RANK_FWD", "RANK_BWD", "WEIGHT_GRAD")
# Past every tile edge: 136 tokens and inputs (128-row and 128-column tiles and a 64-step K each
# end partial, five 32-token gate-sum rows), 264 outputs (past a 256-wide GEMM tile); n = 3 heads
# of r = 4 leave padded rank-space columns. Rows stay on 16 bytes, so the GEMM takes descriptors.
ODD = dict(tokens=136, d_in=136, d_out=264, heads=3, r=4)
LLAMA = dict(tokens=1024, d_in=2048, d_out=8192, heads=4, r=8)  # test_fused_gpu's autotuned shape
# rlora: shared A, router, head dropout, compensation; multilora: one A per head, scalar gates
# (their gradient's per-tile sums), input dropout (also in the input gradient's GEMM epilogue).
CASES = [dict(type="rlora"), dict(type="multilora")]
CONFIGS = [(name, i) for name in KERNELS for i in range(len(getattr(K, name).configs))]


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """torch.empty gives NaNs: a kernel that leaves part of its output unwritten fails the check."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def make_layer(case: dict, d_in: int, d_out: int, heads: int, r: int) -> MultiHeadLoRA:
    torch.manual_seed(0)
    cfg = AdapterConfig(**{"num_heads": heads, "r": r, "lora_alpha": 2 * r, **case, "lora_dropout": 0.1})
    base_dtype = torch.float32 if INTERP else torch.bfloat16  # bf16 under autocast, as in training
    base = nn.Linear(d_in, d_out, device=DEVICE, dtype=base_dtype).requires_grad_(False)
    # random everywhere (no zero init hides a term), scaled like trained adapters
    layer = randomize(MultiHeadLoRA(base, layer_spec(cfg)), d_in ** -0.5, 0.3 * d_in ** -0.5)
    return layer.train()


def check(case: dict, tokens: int, d_in: int, d_out: int, heads: int, r: int, what: str) -> None:
    """One fused forward and backward against float64 with the in-kernel masks replayed; the
    message names every tensor's error, so a failure says which kernel's output is off."""
    layer = make_layer(case, d_in, d_out, heads, r)
    dtype = torch.float32 if INTERP else torch.bfloat16
    x = torch.randn(tokens, d_in, device=DEVICE, dtype=dtype, requires_grad=True)
    up = torch.randn(tokens, d_out, device=DEVICE, dtype=dtype)
    params = dict(layer.named_parameters())
    names = trainable(layer)
    torch.manual_seed(5)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=not INTERP):
        out = fused.fused_forward(layer, x)
    got = torch.autograd.grad(out, [params[k] for k in names] + [x], up.to(out.dtype))
    torch.manual_seed(5)
    masks = fused.dropout_masks(layer, tokens, fused.draw_seeds(torch.device(DEVICE)))
    ref, want = run_float64(layer, x, up, masks)
    errs = {n: err(g, w) for n, g, w in zip(["out", *names, "x"], (out, *got), (ref, *want))}
    bad = {n: e for n, e in errs.items() if not e <= TOL}  # NaN is bad too
    assert not bad, f"{case_id(case)}, {what}: error vs float64 above {TOL}: {bad}; all: {errs}"


def force(monkeypatch, name: str, cfg) -> None:
    """Run kernel `name` on `cfg` alone: as the interpreter's tiles, or as the GPU's fixed config."""
    tiles = getattr(K, name)
    monkeypatch.setattr(K, name, tiles._replace(configs=(cfg,), small=dict(cfg.kwargs)))
    monkeypatch.setenv("RLORA_FUSED_AUTOTUNE", "0")


def shapes():
    yield pytest.param(ODD, id="odd")
    cuda_only = pytest.mark.skipif(INTERP, reason="CUDA only: minutes in the interpreter")
    yield pytest.param(LLAMA, id="llama", marks=[pytest.mark.gpu, cuda_only])


@pytest.mark.slow
@pytest.mark.parametrize("shape", shapes())
@pytest.mark.parametrize("kernel,index", CONFIGS, ids=[f"{n}-{i}" for n, i in CONFIGS])
def test_each_tile_config_matches_float64(kernel, index, shape, monkeypatch):
    configs = getattr(K, kernel).configs
    cfg = configs[index]
    if INTERP and any(c.kwargs == cfg.kwargs for c in configs[:index]):
        pytest.skip("the same tiles as an earlier config: warps and stages do not exist in the interpreter")
    force(monkeypatch, kernel, cfg)
    for tma in ("1", "0") if kernel == "GEMM" else ("1",):  # the GEMM loads through descriptors or pointers
        monkeypatch.setenv("RLORA_FUSED_TMA", tma)
        for case in CASES:
            check(case, **shape, what=f"{kernel} config {index} {cfg} (RLORA_FUSED_TMA={tma})")


def autotuned(name: str, winner: int, log: list):
    """triton.autotune over kernel `name`'s configs with a timer that runs each config once and
    calls `winner` the fastest. Each config's pre_hook also logs (name, index) when it runs."""
    tiles = getattr(K, name)

    def logged(i: int, c):
        def hook(args: dict) -> None:
            log.append((name, i))
            if c.pre_hook is not None:
                c.pre_hook(args)

        return triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=hook)

    def bench(call, quantiles):
        call()  # the config's own pre_hook runs first: log[-1] names it
        return [0.0 if log[-1] == (name, winner) else 1.0] * len(quantiles)

    configs = [logged(i, c) for i, c in enumerate(tiles.configs)]
    return triton.autotune(configs, key=list(tiles.key), do_bench=bench)(tiles.plain)


@pytest.mark.parametrize("last", [False, True], ids=["first-wins", "last-wins"])
def test_autotuner_runs_every_config_then_launches_the_winner(last, monkeypatch):
    """What the GPU's autotuned path does, with the timing replaced: every config runs into the same
    outputs, then the winner runs again (its pre_hook giving the descriptors its tiles) and alone
    decides the result."""
    log, tuners = [], {}
    for name in KERNELS:
        tiles = getattr(K, name)
        winner = len(tiles.configs) - 1 if last else 0
        tuners[name] = autotuned(name, winner, log)
        # The interpreter launches `plain` with `small`; CUDA launches `tuned` with no meta.
        monkeypatch.setattr(K, name, tiles._replace(plain=tuners[name], tuned=tuners[name], small={}))
    monkeypatch.setenv("RLORA_FUSED_AUTOTUNE", "1")
    for case in CASES:
        check(case, **ODD, what=f"autotuned, {'last' if last else 'first'} config wins")
    for name, tuner in tuners.items():
        configs = getattr(K, name).configs
        assert {i for n, i in log if n == name} == set(range(len(configs))), (name, "not every config ran")
        winner = len(configs) - 1 if last else 0
        assert tuner.best_config.kwargs == configs[winner].kwargs, (name, str(tuner.best_config))
        assert log[max(j for j, (n, _) in enumerate(log) if n == name)] == (name, winner), name
