"""Micro-benchmark of the fused Triton adapter path: one adapted linear, forward + backward.

    python -m benchmarks.fused_bench --json fused.json          # on a CUDA machine with triton
    python -m benchmarks.fused_bench --methods rlora --no-compile --fixed-tiles   # a quick subset
    TRITON_INTERPRET=1 python -m benchmarks.fused_bench --smoke # tiny, Triton's interpreter, seconds

Llama-3.2-1B shapes at 8192 tokens (q_proj 2048→2048, gate_proj 2048→8192, down_proj 8192→2048),
r = 8, n = 4, dropout 0.05, bf16 base under bf16 autocast, fp32 or bf16 adapters. Per shape,
method and adapter dtype: the eager layer, the torch.compile'd layer and the fused path; per
shape, the frozen base Linear alone (the floor). Then the base GEMM alone, cuBLAS (torch.mm)
against gemm_lowrank with no low-rank term, forward (x·Wᵀ) and backward (dy·W) layouts,
and with the rank-8·4 delta in the epilogue against cuBLAS's mm + addmm_; the Triton GEMM both
through tensor descriptors (TMA, as the layer runs it on Hopper) and through plain pointers.
Rounds are interleaved, CUDA events, median of the rounds. Every fused row also records its
forward's largest difference from the eager layer (eval mode: no dropout), relative to the eager
output's largest entry; every GEMM row its largest difference from cuBLAS's.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.common import environment, time_ms, write_json
from rlora_cli.adapters import AdapterConfig, MultiHeadLoRA, layer_spec

SHAPES = {"q_proj": (2048, 2048), "gate_proj": (2048, 8192), "down_proj": (8192, 2048)}
SMOKE_SHAPES = {"tiny": (72, 96)}
METHODS = ("lora", "multilora", "hydralora", "rlora")
ADAPTERS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--adapters", default="fp32,bf16", help="adapter dtypes: fp32, bf16 or both")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd layer")
    ap.add_argument("--fixed-tiles", action="store_true",
                    help="one tile config per kernel (RLORA_FUSED_AUTOTUNE=0): no autotuning runs")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, Triton's interpreter on the CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.rounds, args.no_compile, args.adapters = 37, 1, True, "fp32"
    return args


def fused_module():
    """rlora_cli.adapters.fused, or SystemExit with what is missing."""
    from rlora_cli.adapters import fused

    if fused.K is None:
        raise SystemExit("fused_bench needs triton (pip install triton, or PYTHONPATH to a triton install)")
    if not torch.cuda.is_available() and not fused.K.INTERPRETED:
        raise SystemExit("fused_bench needs CUDA, or TRITON_INTERPRET=1 with --smoke")
    return fused


def build(method: str, d_in: int, d_out: int, args: argparse.Namespace, adapter_dtype: torch.dtype | None,
          base_dtype: torch.dtype, device: str) -> MultiHeadLoRA:
    """A trainable adapted linear over a frozen base, with random values in every adapter tensor
    (B starts at zero for some methods, which would hide a wrong delta)."""
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=base_dtype).requires_grad_(False)
    cfg = AdapterConfig(type=method, r=args.r, num_heads=1 if method == "lora" else args.heads,
                        lora_alpha=2 * args.r, lora_dropout=0.05)
    layer = MultiHeadLoRA(base, layer_spec(cfg), dtype=adapter_dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("rlora_"):
                p.normal_(0, d_in ** -0.5)
    return layer.train()


def step_fn(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, up: torch.Tensor,
            autocast: bool) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = forward(x)
        y.backward(up)
    return step


def forward_gap(fused, layer: MultiHeadLoRA, x: torch.Tensor, autocast: bool) -> float:
    """max |fused − eager| / max |eager| of one eval-mode forward (no dropout, so the same math)."""
    layer.eval()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        eager, mine = layer(x).float(), fused.fused_forward(layer, x).float()
    layer.train()
    return ((mine - eager).abs().max() / eager.abs().max()).item()


def layer_steps(fused, shape: str, d_in: int, d_out: int, args, device: str) -> tuple[dict, list[dict]]:
    """{variant key: step} for one shape, and the rows they fill (timings are added later)."""
    autocast = device == "cuda"
    base_dtype = torch.bfloat16 if autocast else torch.float32
    x = torch.randn(args.tokens, d_in, device=device, dtype=base_dtype, requires_grad=True)
    up = torch.randn(args.tokens, d_out, device=device, dtype=base_dtype)
    steps, rows = {}, []

    def add(key: str, step: Callable[[], None], **row: Any) -> None:
        steps[key] = step
        rows.append({"key": key, "shape": shape, "d_in": d_in, "d_out": d_out, **row})

    floor = nn.Linear(d_in, d_out, bias=False, device=device, dtype=base_dtype).requires_grad_(False)
    add(f"{shape}/base", step_fn(floor, x, up, autocast), method="-", adapters="-", variant="base Linear")
    for method in args.methods.split(","):
        for name in args.adapters.split(","):
            layer = build(method, d_in, d_out, args, ADAPTERS[name] if autocast else None, base_dtype, device)
            tag = dict(method=method, adapters=name if autocast else "fp32")
            add(f"{shape}/{method}/{name}/eager", step_fn(layer, x, up, autocast), **tag, variant="eager")
            if not args.no_compile:
                compiled = torch.compile(layer)
                add(f"{shape}/{method}/{name}/compiled", step_fn(compiled, x, up, autocast), **tag,
                    variant="compiled")
            add(f"{shape}/{method}/{name}/fused", step_fn(lambda v, m=layer: fused.fused_forward(m, v), x, up,
                                                          autocast), **tag, variant="fused",
                forward_gap=forward_gap(fused, layer, x.detach(), autocast))
    return steps, rows


def timed(steps: dict[str, Callable[[], None]], rounds: int, device: str) -> dict[str, list[float]]:
    """Warm-up (compiles and autotuning happen here; one step on the CPU), then interleaved rounds."""
    for step in steps.values():
        for _ in range(3 if device == "cuda" else 1):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            times[key].append(time_ms(step, device))
    return times


# cublas-concat (x·Wᵀ + Z·Bᵀ only): one cuBLAS GEMM over [x | Z]·[W | B]ᵀ, the low-rank term as
# extra K columns; the weight block is built once, as a layer would keep it, the input per call.
IMPLS = ("cublas", "triton", "triton-ptr", "cublas-concat")


def gemm_pairs(fused, d_in: int, d_out: int, args, device: str) -> dict[str, tuple[Callable, ...]]:
    """Callables computing the same product, by layout: cuBLAS, gemm_lowrank as it runs in the
    layer (tensor descriptors on Hopper), gemm_lowrank through plain pointers."""
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(args.tokens, d_in, device=device, dtype=dt)
    dy = torch.randn(args.tokens, d_out, device=device, dtype=dt)
    W = torch.randn(d_out, d_in, device=device, dtype=dt) * d_in ** -0.5
    rank = args.r * args.heads
    Z = torch.randn(args.tokens, rank, device=device, dtype=dt)
    B = torch.randn(d_out, rank, device=device, dtype=dt) * rank ** -0.5

    WB = torch.cat([W, B], 1)

    def eager_delta() -> torch.Tensor:
        return torch.mm(x, W.t()).addmm_(Z, B.t())

    return {"x·Wᵀ": (lambda: torch.mm(x, W.t()), lambda: fused.gemm_lowrank(x, W),
                     lambda: fused.gemm_lowrank(x, W, tma=False)),
            "dy·W": (lambda: torch.mm(dy, W), lambda: fused.gemm_lowrank(dy, W.t()),
                     lambda: fused.gemm_lowrank(dy, W.t(), tma=False)),
            "x·Wᵀ + Z·Bᵀ": (eager_delta, lambda: fused.gemm_lowrank(x, W, terms=((Z, B, 1.0),)),
                            lambda: fused.gemm_lowrank(x, W, terms=((Z, B, 1.0),), tma=False),
                            lambda: torch.mm(torch.cat([x, Z], 1), WB.t()))}


def gemm_rows(fused, shape: str, d_in: int, d_out: int, args, device: str) -> list[dict]:
    pairs = gemm_pairs(fused, d_in, d_out, args, device)
    steps = {f"{op}/{who}": fn for op, fns in pairs.items() for who, fn in zip(IMPLS, fns)}
    times = timed(steps, args.rounds, device)
    rows = []
    for op, fns in pairs.items():
        ref = fns[0]().float()
        for who, fn in zip(IMPLS, fns):
            ms = statistics.median(times[f"{op}/{who}"])
            rows.append({"shape": shape, "op": op, "impl": who, "median_ms": ms,
                         "tflops": 2 * args.tokens * d_in * d_out / ms / 1e9 if ms else None,
                         "gap": ((fn().float() - ref).abs().max() / ref.abs().max()).item()})
    return rows


def layer_results(fused, args, device: str) -> list[dict]:
    shapes = SMOKE_SHAPES if args.smoke else {k: SHAPES[k] for k in args.shapes.split(",")}
    results = []
    for shape, (d_in, d_out) in shapes.items():
        torch.manual_seed(0)
        steps, rows = layer_steps(fused, shape, d_in, d_out, args, device)
        times = timed(steps, args.rounds, device)
        floor = statistics.median(times[f"{shape}/base"])
        eager = {r["key"].rsplit("/", 1)[0]: statistics.median(times[r["key"]]) for r in rows
                 if r["variant"] == "eager"}
        for row in rows:
            t = times.pop(row["key"])
            ms = statistics.median(t)
            row.update(median_ms=ms, min_ms=min(t), max_ms=max(t), x_floor=ms / floor if floor else None,
                       x_eager=ms / eager[row["key"].rsplit("/", 1)[0]] if row["variant"] != "base Linear"
                       and eager.get(row["key"].rsplit("/", 1)[0]) else None)
            results.append(row)
    return results


def print_tables(layers: list[dict], gemms: list[dict]) -> None:
    print(f"{'shape':10} {'method':10} {'adapters':8} {'variant':12} {'ms':>8} {'× floor':>8} {'× eager':>8} "
          f"{'fwd gap':>9}")
    for r in layers:
        ratio = f"{r['x_eager']:8.2f}" if r.get("x_eager") else f"{'':8}"
        gap = f"{r['forward_gap']:9.1e}" if "forward_gap" in r else ""
        print(f"{r['shape']:10} {r['method']:10} {r['adapters']:8} {r['variant']:12} {r['median_ms']:8.3f} "
              f"{r['x_floor']:8.2f} {ratio} {gap}")
    print(f"\n{'shape':10} {'GEMM':12} {'impl':10} {'ms':>8} {'TFLOP/s':>8} {'gap':>9}")
    for r in gemms:
        print(f"{r['shape']:10} {r['op']:12} {r['impl']:10} {r['median_ms']:8.3f} {r['tflops'] or 0:8.1f} "
              f"{r['gap']:9.1e}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.fixed_tiles:
        os.environ["RLORA_FUSED_AUTOTUNE"] = "0"  # read at each launch
    fused = fused_module()
    device = "cpu" if args.smoke else "cuda"
    layers = layer_results(fused, args, device)
    shapes = SMOKE_SHAPES if args.smoke else {k: SHAPES[k] for k in args.shapes.split(",")}
    gemms = [row for shape, (d_in, d_out) in shapes.items() for row in gemm_rows(fused, shape, d_in, d_out,
                                                                                  args, device)]
    print_tables(layers, gemms)
    result = {"environment": environment(device), "args": vars(args), "results": layers, "gemm": gemms}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
