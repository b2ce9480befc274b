"""End-to-end training throughput and MFU of an R-LoRA run on Llama-3.2-1B and Qwen2.5-0.5B shapes.

    python -m benchmarks.e2e                                   # one CUDA GPU: both shapes, packing on and off
    python -m benchmarks.e2e --shapes qwen-0.5b --packing on --max-steps 50 --json runs/e2e/qwen.json
    python -m benchmarks.e2e --smoke                           # CPU, tiny shape, 3 steps: checks the pipeline

Run it from the repository root. Steps:
1. Peak: the best of several timed bf16 `torch.mm` (8192³ with CUDA events on the GPU, 512³ with
   perf_counter on the CPU), in TFLOP/s. MFU is measured against this, not the datasheet.
2. Model folders OUT/models/<shape>: the shape's config (benchmarks.shapes), random bf16 weights,
   the project's offline byte-level tokenizer. The vocabulary stays the shape's own (larger than
   the tokenizer's), so the output head costs what it costs on the real model. Kept when rebuilt
   with the same settings.
3. Data OUT/data/synthetic.jsonl: instruction rows of random words, lengths spread so unpadded
   rows vary and packed rows fill max_length.
4. Runs: recipes/gpu/<shape>-shape.yaml with overrides (paths under OUT, data.packing,
   train.max_steps), each in a subprocess (CUDA memory starts empty; the peak is the run's own)
   unless --in-process.
5. Report: from each run's metrics.jsonl, the median over its logging windows (the recipes log
   every 5 steps) of the non-padding input tokens per second (`input_tokens_per_s`; the replayed
   rows below give the same count, kept per window as a check), leaving out every window that
   holds one of the first --warmup-steps (5) steps, and

       FLOPs/token = 4·N + 12 · n_layers · (n_heads · head_dim) · c
       MFU         = FLOPs/token × input tokens/s ÷ peak

   N = benchmarks.shapes.matmul_parameters (2N forward + 2N input gradients: the base is frozen,
   so no weight gradients; adapter FLOPs are not counted). The attention term is QKᵀ and AV
   (4·d·c forward, 8·d·c backward) per layer, where c is the mean causal context per token:
   the tokens a token attends to within its own example (position + 1), averaged over every
   non-padding token the measured steps trained on. Packed rows are block-diagonal per example;
   an unpacked row is one example, padding excluded. The rows are replayed exactly as train.py draws them
   (its data pipeline and sampler), and their label-token counts are checked against the run's.
   FLOPs spent on padding, or on masked-out blocks an attention kernel computes anyway, are not
   useful work and are not counted. The "4N MFU" column leaves attention out. Peak memory is the
   run's torch.cuda.max_memory_allocated (max RSS on the CPU).
6. With --floor: after each shape's runs, the frozen base is timed on full micro-batch ×
   max_length rows in this process, against the same peak, eager with Liger (step_bench's
   `base+liger`) and compiled with Liger's loss as CUDA graphs (`base+ce+compile`, reduce-overhead);
   the faster is the floor, and every row reports its MFU over that floor's (how the 0.5B target
   is stated).

--smoke trains the tiny shape on the CPU through the same steps and the shipped Llama recipe,
with max_length 512: the Alpaca template alone is ~90 tokens with the offline tokenizer, so at
64 every example would be cut to the same length and packing could never put two in a row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.shapes import SHAPES, config, matmul_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"llama-1b": ROOT / "recipes/gpu/llama-1b-shape.yaml",
           "qwen-0.5b": ROOT / "recipes/gpu/qwen-0.5b-shape.yaml",
           "tiny": ROOT / "recipes/gpu/llama-1b-shape.yaml"}  # tiny is a Llama shape
MICRO_BATCH = 8  # the recipes' train.micro_batch_size (sizes the synthetic data)
WARMUP_STEPS = 5  # the first logging window: allocator growth, kernel autotuning, Triton JIT
SMOKE = {"shapes": "tiny", "max_steps": 3, "max_length": 512, "logging_steps": 1, "warmup_steps": 1}
MODEL_MARKER = "e2e_model.json"
MEMORY_FILE = "e2e_memory.json"


class BenchmarkError(RuntimeError):
    """A run that cannot be measured as asked (the command line prints it and exits 2)."""


# ---------------------------------------------------------------------------- 1. peak


def measure_peak(device: str, n: int | None = None, reps: int = 20) -> dict[str, Any]:
    """Best-of-`reps` bf16 matmul throughput on `device`, in TFLOP/s. Best, not median: the
    figure is what the hardware can do; on a shared CPU, many short reps find a quiet moment."""
    import torch

    from benchmarks.common import time_ms

    cuda = device == "cuda"
    n, inner = n or (8192 if cuda else 512), 10 if cuda else 5  # inner: matmuls per timed rep
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    for _ in range(30 if cuda else 3):  # warm-up: cuBLAS heuristics, GPU clocks (~50 ms at 8192)
        torch.mm(a, b, out=c)
    # a, b, c enter the lambda as default arguments, as the `del` below unbinds the names
    best = min(time_ms(lambda a=a, b=b, c=c: [torch.mm(a, b, out=c) for _ in range(inner)], device)
               for _ in range(reps)) / 1e3 / inner
    del a, b, c
    if cuda:
        torch.cuda.empty_cache()
    return {"tflops": 2 * n**3 / best / 1e12,
            "how": f"bf16 torch.mm {n}x{n}x{n}, best of {reps} reps of {inner}"}


# ---------------------------------------------------------------------------- 2. model folders


def model_config(shape: str, tokenizer: Any) -> Any:
    """The shape's config with the tokenizer's special ids (the training loop pads with pad_token_id
    and appends eos_token_id; this tokenizer adds no BOS)."""
    cfg = config(shape)
    cfg.pad_token_id, cfg.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    cfg.bos_token_id = None
    return cfg


def write_model(shape: str, folder: Path, device: str) -> Path:
    """OUT/models/<shape>: config, random bf16 weights (built on `device`), the offline tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlora_cli.files import atomic_dir
    from rlora_cli.testing import build_tokenizer

    tokenizer = build_tokenizer()
    marker = {"shape": shape, "config": SHAPES[shape], "tokenizer": len(tokenizer),
              "pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "dtype": "bfloat16"}
    if (folder / MODEL_MARKER).is_file() and json.loads((folder / MODEL_MARKER).read_text()) == marker:
        return folder
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape, tokenizer), dtype=torch.bfloat16)
    with atomic_dir(folder) as tmp:  # the marker is written last: a half-written folder is never reused
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MODEL_MARKER).write_text(json.dumps(marker, indent=1))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


# ---------------------------------------------------------------------------- 3. data


def word_list() -> list[str]:
    """The offline tokenizer's training words (one or two tokens each)."""
    from rlora_cli.testing import tiny_corpus

    return sorted({w.rstrip(".?!:").lower() for line in tiny_corpus() for w in line.split()
                   if w.rstrip(".?!:").isalpha()})


def write_data(path: Path, n_rows: int, max_length: int, seed: int = 0) -> Path:
    """Instruction rows (instruction, input, output) of random words, the same every time for a
    seed. Prompt and response word counts are log-uniform in [2, max_length/10] each (many short
    examples, a few long ones, as in real instruction data). With ~2 tokens a word plus ~90 of
    Alpaca template, at max_length 1024 the examples are 87-503 tokens (mean ~200): none is cut,
    unpacked batches are ~35% padding, and packing (best fit) puts ~4.9 examples in a row (~98% full)."""
    import random

    rng, words = random.Random(seed), word_list()
    top = max(2, max_length // 10)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n_words)).capitalize() + "."

    def count() -> int:
        return int(math.exp(rng.uniform(math.log(2), math.log(top))))

    lines = []
    for _ in range(n_rows):
        prompt, split = count(), rng.random() < 0.5  # half the rows put part of the prompt in `input`
        head = max(1, prompt // 3) if split else prompt
        row = {"instruction": text(head), "input": text(prompt - head) if split and prompt > head else "",
               "output": text(count())}
        lines.append(json.dumps(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------- 4. runs


def run_overrides(model: Path, data: Path, packing: bool, max_steps: int, max_length: int,
                  logging_steps: int | None) -> list[str]:
    """Dotted overrides that point a shipped recipe at OUT's model and data."""
    out = [f"model.name_or_path={model.resolve()}", f"data.datasets.synthetic.path={data.resolve()}",
           f"data.packing={str(packing).lower()}", f"data.max_length={max_length}",
           f"train.max_steps={max_steps}"]
    if not packing:  # CUDA graphs (the recipes' reduce-overhead) need fixed shapes: packed rows only
        out.append("train.compile_mode=default")
    return out + ([f"output.logging_steps={logging_steps}"] if logging_steps else [])


def train_one(recipe: str, run_dir: str, overrides: list[str]) -> None:
    """One training run (the benchmark's child process): rlora's `train`, then its peak memory."""
    import resource

    import torch

    from rlora_cli.training.loop import train

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train(recipe, tuple(overrides), output=run_dir, overwrite=True)
    if cuda:
        memory = {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "kind": "CUDA max allocated"}
    else:  # ru_maxrss is in KiB on Linux
        memory = {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "kind": "max RSS"}
    write_json(Path(run_dir) / MEMORY_FILE, memory)


def launch(recipe: Path, run_dir: Path, overrides: list[str], device: str, in_process: bool) -> list[str]:
    """Run `train_one`, in a subprocess unless `in_process`; returns the command that runs it on its
    own (in-process runs record it too, as the way to repeat the run)."""
    code = ("import sys; from benchmarks.e2e import train_one; "
            "train_one(sys.argv[1], sys.argv[2], sys.argv[3:])")
    cmd = [sys.executable, "-c", code, str(recipe), str(run_dir), *overrides]
    if in_process:
        train_one(str(recipe), str(run_dir), overrides)
        return cmd
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --smoke on a GPU machine still trains on the CPU
    subprocess.run(cmd, check=True, env=env)
    return cmd


# ---------------------------------------------------------------------------- 5. the rows a run trained on


@dataclass(frozen=True)
class Step:
    """What one optimizer step trained on."""

    inputs: int  # non-padding input tokens
    labels: int  # trained (label) tokens, counted as train.py counts them
    lengths: tuple[int, ...]  # token length of every example (packed rows split at position restarts)


def example_lengths(position_ids: list[int]) -> list[int]:
    """Lengths of the examples of a packed row: a new example starts where the position is 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


def attention_context(lengths: list[int] | tuple[int, ...]) -> float:
    """Mean causal context per token: each token attends to position + 1 tokens of its own
    example, so an example of length L contributes L(L+1)/2 over L tokens."""
    return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


def replay(recipe_path: Path, overrides: list[str]) -> list[Step]:
    """The rows of every optimizer step of a fresh single-process run, drawn as train.py draws
    them: the same data pipeline (`prepare`), its EpochSampler per epoch, micro-batches of
    micro_batch_size, gradient_accumulation_steps of them per step."""
    import datasets

    from rlora_cli.data.pipeline import prepare
    from rlora_cli.model import load_tokenizer
    from rlora_cli.recipe.load import load_recipe
    from rlora_cli.training.state import EpochSampler

    datasets.disable_progress_bars()
    recipe = load_recipe(recipe_path, overrides)
    rows = prepare(recipe, load_tokenizer(recipe.model.name_or_path)).train
    t, packing = recipe.train, recipe.data.packing
    sampler, steps = EpochSampler(len(rows), recipe.seed), []
    while len(steps) < t.max_steps:
        order = list(sampler)
        micro = [order[i:i + t.micro_batch_size] for i in range(0, len(order), t.micro_batch_size)]
        for j in range(0, len(micro), t.gradient_accumulation_steps):
            picked = rows.select([i for m in micro[j:j + t.gradient_accumulation_steps] for i in m])
            ids, labels = picked["input_ids"], picked["labels"]
            lengths = ([n for p in picked["position_ids"] for n in example_lengths(p)] if packing
                       else [len(x) for x in ids])
            steps.append(Step(sum(map(len, ids)), sum(sum(y != -100 for y in lab[1:]) for lab in labels),
                              tuple(lengths)))
            if len(steps) == t.max_steps:
                break
        sampler.epoch += 1
    return steps


# ---------------------------------------------------------------------------- 6. throughput and MFU


def flops_per_token(cfg: Any, context: float) -> tuple[float, float]:
    """(4·N, attention FLOPs) per token for a frozen base (see the module docstring)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context
    return 4.0 * matmul_parameters(cfg), attention


def windows(rows: list[dict[str, Any]], steps: list[Step]) -> list[dict[str, Any]]:
    """One entry per training row of metrics.jsonl: its steps, wall time, input tokens/s and whether
    the replayed label tokens equal the run's. A window's time is its label tokens ÷ tokens_per_s (train.py
    reports both over the same window)."""
    out, prev_step, prev_tokens = [], 0, 0
    for r in rows:
        span = steps[prev_step:r["step"]]
        labels = r["tokens"] - prev_tokens
        seconds = labels / r["tokens_per_s"]
        replayed = sum(s.inputs for s in span) / seconds
        out.append({"first": prev_step + 1, "last": r["step"], "seconds": seconds,
                    "input_tokens_per_s": r["input_tokens_per_s"],
                    "replayed_input_tokens_per_s": replayed,
                    "labels_match": sum(s.labels for s in span) == labels})
        prev_step, prev_tokens = r["step"], r["tokens"]
    return out


def summarize(shape: str, packing: bool, run_dir: Path, steps: list[Step], warmup: int,
              peak_tflops: float) -> dict[str, Any]:
    """The table row of one run (with what it was computed from)."""
    from rlora_cli.runs import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    every = windows(rows, steps)
    kept = [w for w in every if w["first"] > warmup]
    if not kept:
        raise BenchmarkError(f"{run_dir}: no logging window starts after the {warmup} warm-up steps; "
                         "raise --max-steps or lower --logging-steps")
    measured = [s for w in kept for s in steps[w["first"] - 1:w["last"]]]
    context = attention_context([n for s in measured for n in s.lengths])
    cfg = config(shape)
    dense, attention = flops_per_token(cfg, context)
    tokens_per_s = statistics.median(w["input_tokens_per_s"] for w in kept)
    extra = {name: json.loads((run_dir / name).read_text()) for name in (MEMORY_FILE, "run_info.json")
             if (run_dir / name).is_file()}
    return {
        "shape": shape, "packing": packing, "input_tokens_per_s": tokens_per_s,
        "step_ms": statistics.median(1e3 * w["seconds"] / (w["last"] - w["first"] + 1) for w in kept),
        "mfu": (dense + attention) * tokens_per_s / (peak_tflops * 1e12),
        "mfu_4n": dense * tokens_per_s / (peak_tflops * 1e12),
        "peak_memory_gib": extra.get(MEMORY_FILE, {}).get("peak_memory_gib"),
        "memory": extra.get(MEMORY_FILE),
        "flops_per_token": dense + attention, "flops_4n": dense, "flops_attention": attention,
        "matmul_parameters": matmul_parameters(cfg), "attention_context": context,
        "examples_per_step": statistics.mean(len(s.lengths) for s in measured),
        "input_tokens_per_step": statistics.mean(s.inputs for s in measured),
        "replay_matches": all(w["labels_match"] for w in every),
        "warmup_steps": warmup, "windows_used": len(kept), "windows": every, "run_dir": str(run_dir),
        "run_info": extra.get("run_info.json"),
    }


def frozen_floor(shape: str, rows: int, seq: int, device: str, peak_tflops: float,
                 smoke: bool) -> dict[str, Any]:
    """The frozen base alone on full rows×seq steps, timed as step_bench times it, in this
    process: the floor the MFU target is stated against, with the same peak. On CUDA the faster
    of two: eager with Liger, and compiled blocks with Liger's loss replayed as CUDA graphs (as
    the recipes compile; it matters for narrow models, whose eager steps the host paces). Both use
    Liger's stock fused loss, as every step_bench variant does. Every token is real there and
    attends to its whole prefix, so c = (seq + 1) / 2."""
    import torch

    from benchmarks.step_bench import bench, build_base, free_memory, parse_name

    names = ["base"] if device == "cpu" else ["base+liger", "base+ce+compile"]
    base = build_base(shape, torch.device(device))
    timed = bench(base, {n: parse_name(n) for n in names}, (rows, seq), *((1, 2) if smoke else (3, 10)),
                  "reduce-overhead" if device == "cuda" else "default")
    cfg = base.config
    del base
    torch._dynamo.reset()  # the compiled variant's graphs and CUDA-graph pool go before the next shape
    free_memory()
    failed = [f"{r['variant']}: {r['error']}" for r in timed if not r["ok"]]
    if failed:
        raise BenchmarkError(f"the {shape} floor failed: {'; '.join(failed)}")
    row = min(timed, key=lambda r: r["median_ms"])
    context = (seq + 1) / 2
    dense, attention = flops_per_token(cfg, context)
    tps = row["tokens_per_s"]
    return {"variant": row["variant"], "batch": row["batch"], "step_ms": row["median_ms"],
            "tokens_per_s": tps, "attention_context": context,
            "mfu": (dense + attention) * tps / (peak_tflops * 1e12),
            "mfu_4n": dense * tps / (peak_tflops * 1e12),
            "timed": {r["variant"]: r["median_ms"] for r in timed}}


def table(results: list[dict[str, Any]]) -> str:
    floors = any("floor" in r for r in results)
    head = (f"{'shape':<10} {'packing':<7} {'input tok/s':>12} {'step ms':>9} {'MFU':>7} {'4N MFU':>7} "
            f"{'c':>7} {'peak mem GiB':>12}" + (f" {'floor MFU':>9} {'× floor':>7}" if floors else ""))
    lines = [head, "-" * len(head)]
    for r in results:
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        line = (f"{r['shape']:<10} {'on' if r['packing'] else 'off':<7} {r['input_tokens_per_s']:>12,.0f} "
                f"{r['step_ms']:>9.1f} {r['mfu']:>7.2%} {r['mfu_4n']:>7.2%} {r['attention_context']:>7.1f} "
                f"{mem:>12}")
        if "floor" in r:
            line += f" {r['floor']['mfu']:>9.2%} {r['vs_floor_mfu']:>7.2f}"
        lines.append(line)
    if floors:
        lines.append("floor: the frozen base (+ Liger on CUDA, eager or compiled, the faster) on full rows, "
                     "timed in this run; × floor = MFU ÷ floor MFU")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama-1b,qwen-0.5b",
                    help="comma-separated: llama-1b, qwen-0.5b, tiny")
    ap.add_argument("--packing", default="on,off", help="on, off or on,off")
    # 60: on an H200 in round 3, a packed compiled Llama run still spent 1.4-6.8 s of one-time work
    # in five of its logging windows up to step 35, so 30 steps left no steady window for the median
    ap.add_argument("--max-steps", type=int, default=60,
                    help="steps per run; the median window must come after the compiled run settles")
    ap.add_argument("--max-length", type=int, default=1024, help="data.max_length (the recipes' 1024)")
    ap.add_argument("--logging-steps", type=int, default=None, help="output.logging_steps (the recipes' 5)")
    ap.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                    help="logging windows holding any of the first N steps are left out")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more recipe overrides for every run, e.g. train.compile=true")
    ap.add_argument("--out", default="runs/e2e", help="models, data and runs go here")
    ap.add_argument("--json", default=None, help="the results file (default OUT/e2e.json)")
    ap.add_argument("--in-process", action="store_true",
                    help="train in this process (no subprocess: CUDA memory and the peak are shared)")
    ap.add_argument("--floor", action="store_true",
                    help="also time the frozen base (+ Liger) on full rows in this run "
                         "and report MFU against it")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CPU, tiny shape, {SMOKE['max_steps']} steps, max_length {SMOKE['max_length']}, "
                         "logging every step")
    args = ap.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.set = ["train.compile=false", *args.set]  # compiling on 2 CPU cores takes minutes
    if args.max_steps < 1:
        ap.error("--max-steps must be at least 1 (the report needs logging windows after the warm-up)")
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown or not set(args.packing.split(",")) <= {"on", "off"}:
        ap.error(f"unknown shape(s) {sorted(unknown)}" if unknown else "--packing takes on, off or on,off")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from rlora_cli.recipe.load import load_recipe

    args = parse(argv)
    console, out = Console(highlight=False), Path(args.out)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        console.print("[yellow]no CUDA device[/]: the full benchmark on the CPU is slow; "
                      "--smoke checks the pipeline")
    peak = measure_peak(device)
    console.print(f"peak: {peak['tflops']:.2f} TFLOP/s ({peak['how']}, {device})")
    data = write_data(out / "data" / "synthetic.jsonl", max(64, 6 * MICRO_BATCH * args.max_steps),
                      args.max_length)
    results: list[dict[str, Any]] = []
    report = {"command": [sys.executable, "-m", "benchmarks.e2e", *(sys.argv[1:] if argv is None else argv)],
              "environment": environment(device), "peak_tflops": peak["tflops"], "peak_how": peak["how"],
              "warmup_steps": args.warmup_steps, "max_steps": args.max_steps, "max_length": args.max_length,
              "results": results}
    json_path = Path(args.json) if args.json else out / "e2e.json"
    for shape in args.shapes.split(","):
        model = write_model(shape, out / "models" / shape, device)
        recipe = RECIPES[shape]
        for packing in (p == "on" for p in args.packing.split(",")):
            run_dir = out / f"{shape}-packing-{'on' if packing else 'off'}"
            overrides = [*run_overrides(model, data, packing, args.max_steps, args.max_length,
                                        args.logging_steps),
                         *args.set]
            console.rule(f"{shape}, packing {'on' if packing else 'off'}")
            cmd = launch(recipe, run_dir, overrides, device, args.in_process)
            row = summarize(shape, packing, run_dir, replay(recipe, overrides), args.warmup_steps,
                            peak["tflops"])
            if not row["replay_matches"]:
                console.print(f"[red]warning[/]: the replayed rows of {run_dir} do not match the run's "
                              "label-token counts, so the attention context c may be off")
            row["command"] = cmd
            row["overrides"] = list(args.set)
            row["rlora_train"] = shlex.join(["rlora", "train", str(recipe.relative_to(ROOT)), *overrides,
                                           "--output", str(run_dir), "--overwrite"])
            results.append(row)
            write_json(json_path, report)  # after every run: a later failure loses nothing measured
        if args.floor:  # after the shape's runs, which train in their own processes
            console.rule(f"{shape}, frozen base floor")
            rows = load_recipe(recipe, overrides).train.micro_batch_size  # the runs' own, after --set
            floor = frozen_floor(shape, rows, args.max_length, device, peak["tflops"], args.smoke)
            for row in results:
                if row["shape"] == shape:
                    # (the 4N-MFU ratio is the tokens/s ratio: the same FLOPs per token and peak)
                    row |= {"floor": floor, "vs_floor_mfu": row["mfu"] / floor["mfu"],
                            "vs_floor_tokens": row["input_tokens_per_s"] / floor["tokens_per_s"]}
            write_json(json_path, report)
    console.print(f"\n{report['environment']['device']}, peak {peak['tflops']:.2f} TFLOP/s; medians over the "
                  f"logging windows after {args.warmup_steps} warm-up step(s)", markup=False)
    console.print(table(results) + f"\nwritten: {json_path}", markup=False)
    return report


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
