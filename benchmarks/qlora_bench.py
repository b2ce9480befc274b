"""QLoRA on one GPU: rlora over a 4-bit base against bf16 rlora and PEFT QLoRA, step time and peak memory.

    python -m benchmarks.qlora_bench --out runs/qlora_bench.json                # llama-1b, 8x1024
    python -m benchmarks.qlora_bench --liger --gradient-checkpointing --out runs/qlora_gc.json
    python -m benchmarks.qlora_bench --smoke --out /tmp/qlora.json              # tiny, CPU, seconds

Each variant takes full training steps exactly as benchmarks/step_bench.py times them (its
helpers build, step and measure them: zero_grad, forward under bf16 autocast, next-token loss,
backward, AdamW; warm-up, then interleaved rounds timed with CUDA events, median):
- rlora-bf16: rlora (n = 4, r = 8, α = 16, dropout 0.05 on q,k,v,o,gate,up,down) over the bf16 base;
- rlora-nf4: the same adapter over the base loaded as `model.quantization: {bits: 4}` loads it
  (nf4, double quant, bf16 compute, transformers' BitsAndBytesConfig); fp32 adapter weights;
- peft-qlora: PEFT LoraConfig(r = 8, α = 16, dropout 0.05, same modules) on that same 4-bit base,
  without prepare_model_for_kbit_training (it would cast the norms, embeddings and LM head to fp32
  and switch gradient checkpointing on: another run than the other two); `peft-bf16` (PEFT over
  the bf16 base) can be added with --variants.
The bf16 base is random-init from benchmarks/shapes.py (no download); it is saved to a temporary
folder and loaded back quantized through `rlora_cli.model.load_model`. Peak memory is that of a
process holding only the variant: its base as allocated by loading it (quantization state
included), its own tensors (adapters, AdamW state) and the step's transient peak. Flags apply to
every variant alike: --liger (step_bench's +liger), --compile, --gradient-checkpointing.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from benchmarks.common import environment, time_ms, write_json
from benchmarks.step_bench import (
    Spec,
    Variant,
    attempt,
    build_base,
    build_variant,
    free_memory,
    make_batch,
    own_bytes,
    peak_gib,
    plain_rope,
    profile_step,
    shared_tensors,
    train_step,
)
from rlora_cli.adapters import parameter_counts
from rlora_cli.config import COMPILE_MODES
from rlora_cli.config.model import QuantizationConfig
from rlora_cli.model import load_model
from rlora_cli.testing import build_tokenizer

NF4 = QuantizationConfig(bits=4, type="nf4", double_quant=True, compute_dtype="bf16")
VARIANTS = {"rlora-bf16": ("rlora", "bf16"), "rlora-nf4": ("rlora", "nf4"),
            "peft-bf16": ("peft-lora", "bf16"), "peft-qlora": ("peft-lora", "nf4")}
DEFAULT = ("rlora-bf16", "rlora-nf4", "peft-qlora")
# What the lead checks: (name, numerator, denominator, field, at most).
TARGETS = (("peak nf4/bf16", "rlora-nf4", "rlora-bf16", "peak_gib", 0.60),
           ("step nf4/bf16", "rlora-nf4", "rlora-bf16", "median_ms", 1.35),
           ("step nf4/peft-qlora", "rlora-nf4", "peft-qlora", "median_ms", 0.95))


# ------------------------------------------------------------------------------------ building


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def quantized_copy(base: nn.Module, device: torch.device) -> nn.Module:
    """`base` saved and loaded back 4-bit, as `rlora train` loads a recipe's quantized model."""
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)  # load_model reads one; the steps use none
        model, _ = load_model(folder, dtype="bf16", quantization=NF4, device=device)
    return model.requires_grad_(False).train()


def build_bases(shape: str, device: torch.device, kinds: set[str]) -> dict[str, tuple[nn.Module, int]]:
    """{"bf16" | "nf4": (base, bytes its loading allocated)}; the bf16 one is always built."""
    free_memory()
    before = allocated(device)
    bf16 = build_base(shape, device)
    bases = {"bf16": (bf16, allocated(device) - before)}
    if "nf4" in kinds:
        free_memory()
        before = allocated(device)
        nf4 = quantized_copy(bf16, device)
        free_memory()
        bases["nf4"] = (nf4, allocated(device) - before)
    return bases


def spec_of(name: str, args: argparse.Namespace) -> Spec:
    kind, _ = VARIANTS[name]
    return Spec(kind, liger=args.liger, compiled=args.compile)


def build(base: nn.Module, spec: Spec, args: argparse.Namespace) -> Variant:
    v = build_variant(base, spec, args.compile_mode)
    if args.gradient_checkpointing:
        hf = v.model.get_base_model() if hasattr(v.model, "get_base_model") else v.model
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return v


# ------------------------------------------------------------------------------------ measuring


def measure(args: argparse.Namespace, names: list[str], device: torch.device,
            warmup: int, steps: int) -> list[dict[str, Any]]:
    """Every variant built, warmed, timed in interleaved rounds, then profiled and its peak taken."""
    bases = build_bases(args.shape, device, {VARIANTS[n][1] for n in names})
    ids, labels = make_batch(*args.batch, bases["bf16"][0].config.vocab_size, device)
    home = sys.modules[type(bases["bf16"][0]).__module__]
    variants: dict[str, Variant] = {}
    failures: dict[str, str] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    extra: dict[str, dict[str, Any]] = {}

    def warm(name: str) -> None:
        for _ in range(warmup):
            train_step(variants[name], ids, labels)

    def timed(name: str) -> None:
        times[name].append(time_ms(lambda: train_step(variants[name], ids, labels), device.type))

    def stats(name: str) -> None:
        v, (base, base_bytes) = variants[name], bases[VARIANTS[name][1]]
        held = base_bytes + own_bytes(v, shared_tensors(base))
        kernels, busy, _ = profile_step(v, ids, labels)
        cuda = device.type == "cuda"  # the CPU has no allocator statistics: no memory numbers
        extra[name] = {"peak_gib": peak_gib(v, ids, labels, held), "held_gib": held / 2**30 if cuda else None,
                       "base_gib": base_bytes / 2**30 if cuda else None, "kernels": kernels, "busy_ms": busy,
                       "loss": float(v.last_loss), "trainable": parameter_counts(v.model)[0]}

    try:
        for name in names:
            attempt(variants, failures, name, lambda: variants.update(
                {name: build(bases[VARIANTS[name][1]][0], spec_of(name, args), args)}))
        for step in (warm, *[timed] * steps, stats):  # warm-up of all, rounds of one step each, stats
            for name in list(variants):
                attempt(variants, failures, name, lambda: step(name))
    finally:
        home.apply_rotary_pos_emb = plain_rope(home)
        variants.clear()
    return [row(name, args, times[name], extra.get(name), failures.get(name)) for name in names]


def row(name: str, args: argparse.Namespace, ms: list[float], extra: dict[str, Any] | None,
        error: str | None) -> dict[str, Any]:
    flags = "".join(f"+{f}" for f in ("liger", "compile", "gradient_checkpointing") if getattr(args, f))
    out = {"variant": name, "flags": flags, "shape": args.shape, "batch": "{}x{}".format(*args.batch),
           "ok": error is None}
    if error is not None:
        return {**out, "error": error}
    median = statistics.median(ms)
    return {**out, "median_ms": median, "min_ms": min(ms), "max_ms": max(ms),
            "tokens_per_s": args.batch[0] * args.batch[1] / (median / 1e3), **(extra or {})}


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target's ratio (None when a side is missing) and whether it is met."""
    by = {r["variant"]: r for r in rows if r["ok"]}
    out = []
    for label, num, den, field, limit in TARGETS:
        a, b = by.get(num, {}).get(field), by.get(den, {}).get(field)
        ratio = a / b if a is not None and b else None
        out.append({"target": f"{label} <= {limit}", "ratio": ratio,
                    "met": None if ratio is None else ratio <= limit})
    return out


def _f(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    out = ["| variant | shape | batch | step ms (min–max) | tok/s | busy ms | kernels | base GiB | peak GiB "
           "| trainable |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['variant']}{r['flags']} | {r['shape']} | {r['batch']} "
        if not r["ok"]:
            out.append(head + f"| failed: {r['error']} |" + " – |" * 6)
            continue
        out.append(head + f"| {r['median_ms']:.2f} ({r['min_ms']:.2f}–{r['max_ms']:.2f}) "
                   f"| {r['tokens_per_s']:,.0f} | {_f(r['busy_ms'], '.2f')} | {_f(r['kernels'], 'd')} "
                   f"| {_f(r['base_gib'], '.3f')} | {_f(r['peak_gib'], '.2f')} | {r['trainable']:,} |")
    out += ["", "| target | ratio | met |", "|---|---|---|"]
    out += [f"| {c['target']} | {_f(c['ratio'], '.3f')} | {_f(c['met'], '')} |" for c in checks]
    return "\n".join(out)


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="write the results as JSON here")
    ap.add_argument("--shape", default="llama-1b", help="a name from benchmarks/shapes.py")
    ap.add_argument("--batch", default="8x1024", help="ROWSxTOKENS")
    ap.add_argument("--variants", default=",".join(DEFAULT), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--liger", action="store_true", help="Liger kernels and fused loss (step_bench +liger)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    ap.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2x16, 1+2 steps")
    args = ap.parse_args(argv)
    unknown = [n for n in args.variants.split(",") if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.smoke:
        args.shape, args.batch, args.warmup, args.steps, args.liger = "tiny", "2x16", 1, 2, False
    args.batch = tuple(int(x) for x in args.batch.split("x"))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the table, write --out, and return what was written."""
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # a toy model on a shared CPU: more threads only add timing spikes
    try:
        rows = measure(args, args.variants.split(","), device, args.warmup, args.steps)
    finally:
        torch.set_num_threads(threads)
    checks = targets(rows)
    result = {"meta": {"environment": environment(device.type),
                       "command": shlex.join(["python", "-m", "benchmarks.qlora_bench",
                                              *(sys.argv[1:] if argv is None else argv)]),
                       "quantization": asdict(NF4), "warmup": args.warmup, "steps": args.steps,
                       "peft_prepare_model_for_kbit_training": False},
              "results": rows, "targets": checks}
    print(table(rows, checks))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
