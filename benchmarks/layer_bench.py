"""Micro-benchmark of one adapted linear: forward + backward, bf16 autocast, on one GPU.

    python -m benchmarks.layer_bench            # on a CUDA machine
    python -m benchmarks.layer_bench --smoke    # tiny shapes on the CPU, checks it still runs

Compares PEFT's LoRA layer, rlora's four methods and a reference-style R-LoRA (per-head Python
loop, A·x recomputed per head, n full-width outputs, as the released code does) on Llama-3.2-1B
shapes. Rounds are interleaved so clock drift hits every variant alike. Reports the median time
of forward+backward, kernels launched per step (torch.profiler) and peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import environment, time_ms, write_json
from rlora_cli.adapters import AdapterConfig, MultiHeadLoRA, layer_spec

SHAPES = {"q_proj": (2048, 2048), "k_proj": (2048, 512), "gate_proj": (2048, 8192), "down_proj": (8192, 2048)}


class ReferenceRLoRA(nn.Module):
    """The released code's structure: one module per head, looped in Python."""

    def __init__(self, base: nn.Linear, r: int, n: int, alpha: float, p: float) -> None:
        super().__init__()
        self.base, self.s = base, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(n))
        self.route = nn.Linear(base.in_features, n, bias=False)
        self.drop = nn.ModuleList(nn.Dropout(p) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        w = torch.softmax(self.route(x).float(), -1).to(x.dtype)
        for i, (B, drop) in enumerate(zip(self.lora_B, self.drop)):
            out = out + self.s * w[..., i:i + 1] * B(drop(self.lora_A(x)))
        return out


def build(variant: str, d_in: int, d_out: int, r: int, n: int, device: str) -> nn.Module:
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    if variant == "peft_lora":
        from peft import LoraConfig, inject_adapter_in_model

        holder = nn.Module()
        holder.lin = base  # PEFT's public injection API, stable across its versions
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=["lin"]),
                                holder)
        layer = holder.lin
    elif variant == "reference_rlora":
        layer = ReferenceRLoRA(base, r, n, 2 * r, 0.05)
    else:
        method = variant.split("_")[0]
        heads = 1 if method == "lora" else n
        cfg = AdapterConfig(type=method, r=r, num_heads=heads, lora_alpha=2 * r, lora_dropout=0.05)
        layer = MultiHeadLoRA(base, layer_spec(cfg),
                              dtype=torch.bfloat16 if variant.endswith("bf16") else None)
    layer.to(device)
    for name, p in layer.named_parameters():
        p.requires_grad_(not name.startswith("base"))
    return layer.train()


def step_fn(layer: nn.Module, x: torch.Tensor, up: torch.Tensor, device: str) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            y = layer(x)
        y.backward(up)
    return step


def kernels_per_step(step: Callable[[], None]) -> int:
    """Every CUDA event of one step, memcpy/memset included (the unit of this file's recorded
    results; benchmarks.common.cuda_kernels, used by the full-step benchmark, leaves them out)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    shapes = {"tiny": (32, 48)} if args.smoke else SHAPES
    tokens, rounds = (16, 2) if args.smoke else (args.tokens, args.rounds)
    variants = ["peft_lora", "lora", "multilora", "hydralora", "rlora", "rlora_bf16", "reference_rlora"]
    results = []
    for shape, (d_in, d_out) in shapes.items():
        torch.manual_seed(0)
        layers = {v: build(v, d_in, d_out, args.r, args.heads, device) for v in variants}
        x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        up = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
        steps = {v: step_fn(layer, x, up, device) for v, layer in layers.items()}
        for step in steps.values():  # warm-up
            for _ in range(3):
                step()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):  # interleaved rounds
            for v, step in steps.items():
                times[v].append(time_ms(step, device))
        for v, step in steps.items():
            row = {"shape": shape, "d_in": d_in, "d_out": d_out, "variant": v,
                   "median_ms": statistics.median(times[v]), "min_ms": min(times[v]), "max_ms": max(times[v])}
            if device == "cuda":
                row["kernels"] = kernels_per_step(step)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                with torch.autocast(device, dtype=torch.bfloat16):
                    y = layers[v](x)
                row["saved_MiB"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
                del y
            results.append(row)
    anchor = {r["shape"]: r["median_ms"] for r in results if r["variant"] == "peft_lora"}
    print(f"{'shape':10} {'variant':16} {'ms':>8} {'vs peft':>8} {'kernels':>8} {'fwd MiB':>8}")
    for r in results:
        ratio = r["median_ms"] / anchor[r["shape"]]
        print(f"{r['shape']:10} {r['variant']:16} {r['median_ms']:8.3f} {ratio:8.2f} "
              f"{r.get('kernels', 0):8d} {r.get('saved_MiB', 0):8.1f}")
    if args.json:
        write_json(args.json, {"environment": environment(device), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
