"""One recipe on 1 GPU, DDP ×N and FSDP2 ×N at one global batch: speed, losses, resume, the final save.

    python -m benchmarks.multi_gpu --out runs/multi_gpu           # all GPUs: N = 2, and 4 when there are 4
    python -m benchmarks.multi_gpu --gpus 2 --only 1gpu,ddp2 --out runs/multi_gpu
    python -m benchmarks.multi_gpu --mode small --out runs/multi_gpu_small    # the small model, 20 steps
    python -m benchmarks.multi_gpu --smoke --out /tmp/multi_gpu   # CPU: tiny shape, 1 and 2 gloo processes

Run it from the repository root. `shape` (the default) trains recipes/gpu/llama-1b-shape.yaml as
shipped (packed, compiled, Liger's fused loss) on benchmarks.e2e's random Llama-3.2-1B-shaped
model and synthetic rows; `small`, a random hidden-1024, 8-layer model on the demo mixture. Dropout
is off (each process would draw its own masks). One global batch: each GPU takes the recipe's
micro-batch, 1 GPU accumulates N_max of them and N GPUs N_max / N; rank r reads every N-th row of
the epoch's permutation, so every run's step trains on the same rows. Each run (`accelerate launch
--config_file configs/accelerate/{ddp,fsdp}.yaml --num_processes N`) records each process's peak
memory and saves a checkpoint at the middle logging step; an N-GPU run is then copied, cut back to
it (as a run killed just after saving it leaves its folder) and resumed with `--resume auto`.

Reported, over the logging windows after --warmup-steps: median input tokens/s (all GPUs) and step
time; MFU per GPU = FLOPs/token × tokens/s ÷ (N × peak), benchmarks.e2e's FLOPs and measured peak;
peak memory (the largest rank's); scaling = tokens/s ÷ (N × 1-GPU tokens/s); the largest relative
loss gap per logged step and the final adapter against the 1-GPU run and, resumed, against the
uninterrupted run (FSDP's save gathers the shards: same shapes). ✗ flags a loss gap over
LOSS_RTOL (bf16 rounding compounds). Writes OUT/multi_gpu.json after each run, and OUT/multi_gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks import e2e
from benchmarks.common import environment, write_json
from rlora_cli.runs import read_metrics
from rlora_cli.testing import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = {"ddp": ROOT / "configs/accelerate/ddp.yaml", "fsdp": ROOT / "configs/accelerate/fsdp.yaml"}
LOSS_RTOL = 2e-2  # bf16: 8 significant bits (~4e-3 a rounding), compounded over the steps
SMALL_RECIPE = """\
seed: 0
model: {{name_or_path: {model}, dtype: auto}}
adapter: {{type: rlora, r: 8, num_heads: 4, lora_dropout: 0.0, target_modules: all-linear}}
data: {{max_length: 256, datasets: {datasets}}}
train: {{max_steps: 20, micro_batch_size: 8, gradient_accumulation_steps: 1, learning_rate: 1.0e-3,
        warmup_ratio: 0.1, precision: bf16, kernels: none}}
output: {{save_steps: 0, save_total_limit: 0, logging_steps: 1}}
"""


class BenchmarkError(RuntimeError):
    """A benchmark that cannot run as asked (the command line prints it and exits 2)."""


@dataclass(frozen=True)
class Plan:
    """One run: its name, its processes, how they are launched, its accumulation."""

    name: str           # 1gpu, ddp2, fsdp2, ddp4, fsdp4
    world: int
    kind: str           # single | ddp | fsdp
    accumulation: int


@dataclass(frozen=True)
class Bench:
    """What every run of one invocation shares."""

    out: Path
    recipe: Path
    overrides: list[str]    # for every run: paths, steps, logging, the middle checkpoint
    cpu: bool               # gloo processes on the CPU (--smoke)
    mid: int                # the checkpoint the resume check restarts from (0: no check)
    micro: int              # train.micro_batch_size
    warmup: int
    peak_tflops: float
    config: Any             # the model's transformers config (FLOPs per token)
    steps: list[e2e.Step]   # what each step trains on, the same in every run


def plans(gpus: int, accumulation: int, fsdp: bool = True) -> list[Plan]:
    """1 GPU, then DDP (and FSDP2) on 2, and on 4 where there are that many; the global batch is
    the recipe's micro-batch × `accumulation` × the largest N in every run."""
    sizes = [n for n in (2, 4) if n <= gpus]
    if not sizes:
        raise BenchmarkError(f"{gpus} GPU(s): scaling needs at least 2 (--smoke checks it on the CPU)")
    top = max(sizes)
    out = [Plan("1gpu", 1, "single", accumulation * top)]
    for n in sizes:
        out += [Plan(f"{kind}{n}", n, kind, accumulation * top // n) for kind in ("ddp", "fsdp")[:1 + fsdp]]
    return out


def command(plan: Plan) -> list[str]:
    """The command that trains `plan` (its worker also writes each process's peak memory)."""
    worker = ["-m", "benchmarks.multi_gpu", "--worker"]
    if plan.kind == "single":
        return [sys.executable, *worker]
    with socket.socket() as s:  # a free port: back-to-back launches may find 29500 still held
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE[plan.kind]),
            "--num_processes", str(plan.world), "--main_process_port", str(port), *worker]


def worker(argv: list[str]) -> None:
    """In each launched process: `rlora train`'s function, then this process's peak memory.
    argv: RECIPE RUN_DIR RESUME OVERRIDE..."""
    import resource

    import torch

    from rlora_cli.training.loop import train

    recipe, run_dir, resume, *overrides = argv
    train(recipe, tuple(overrides), output=run_dir, resume=resume, overwrite=resume == "never")
    if torch.cuda.is_available():  # train() ran on this process's GPU, the current device
        peak, kind = torch.cuda.max_memory_allocated() / 2**30, "CUDA max allocated"
    else:  # ru_maxrss is in KiB on Linux
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "max RSS"
    write_json(Path(run_dir) / f"memory-rank{os.environ.get('RANK', '0')}.json",
               {"peak_memory_gib": peak, "kind": kind})


def run(plan: Plan, bench: Bench, run_dir: Path, resume: str = "never") -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if bench.cpu:  # gloo processes; Accelerate then ignores the configs' GPU settings
        env |= {"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    elif plan.kind == "single":
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    cmd = [*command(plan), str(bench.recipe), str(run_dir), resume,
           *bench.overrides, f"train.gradient_accumulation_steps={plan.accumulation}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def cut_back(run_dir: Path, copy: Path, step: int) -> Path:
    """A copy of a finished run as a run killed just after it saved checkpoint-`step` leaves it."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy)
    for p in copy.iterdir():
        later = p.name.startswith("checkpoint-") and int(p.name.split("-")[1]) > step
        if later or p.name in ("adapter", "plots") or p.name.startswith("memory-rank"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return copy


# ---------------------------------------------------------------------------- measuring a run


def logged(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def loss_gap(base: list[dict[str, Any]], other: list[dict[str, Any]], after: int = 0) -> dict[str, Any]:
    """Over the logged steps after `after`: the largest |Δloss| and |Δloss| / |loss| of `other`
    against `base`, and whether the relative one is within LOSS_RTOL."""
    a = {r["step"]: r["loss"] for r in base if r["step"] > after}
    b = {r["step"]: r["loss"] for r in other if r["step"] > after}
    if not a or sorted(a) != sorted(b):
        return {"steps": sorted(b), "ok": False, "error": f"logged steps differ from {sorted(a)}"}
    rel = max(abs(b[s] - a[s]) / abs(a[s]) for s in a)
    return {"steps": sorted(a), "max_abs": max(abs(b[s] - a[s]) for s in a), "max_rel": rel,
            "ok": rel <= LOSS_RTOL}


def adapter_gap(base: Path, other: Path) -> dict[str, Any]:
    """The final adapters: the same names and shapes (a sharded save would not be), the largest |Δ|."""
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "adapter" / "rlora_adapter.safetensors")) for p in (base, other))
    same = a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if same else None
    return {"tensors": len(b), "same_shapes": same, "max_abs": diff}


def throughput(run_dir: Path, bench: Bench, world: int) -> dict[str, Any]:
    """Median input tokens/s and step time over the windows after the warm-up, MFU per GPU, and
    the largest peak memory of the run's processes."""
    every = e2e.windows(logged(run_dir), bench.steps)
    kept = [w for w in every if w["first"] > bench.warmup]
    if not kept:
        raise BenchmarkError(f"{run_dir}: no logging window starts after the {bench.warmup} warm-up steps")
    tokens_per_s = statistics.median(w["input_tokens_per_s"] for w in kept)
    measured = [s for w in kept for s in bench.steps[w["first"] - 1:w["last"]]]
    context = e2e.attention_context([n for s in measured for n in s.lengths])
    dense, attention = e2e.flops_per_token(bench.config, context)
    memory = [json.loads(p.read_text())["peak_memory_gib"] for p in sorted(run_dir.glob("memory-rank*.json"))]
    return {"input_tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / world,
            "step_ms": statistics.median(1e3 * w["seconds"] / (w["last"] - w["first"] + 1) for w in kept),
            "mfu_per_gpu": (dense + attention) * tokens_per_s / (world * bench.peak_tflops * 1e12),
            "peak_memory_gib": max(memory) if memory else None, "memory_per_rank_gib": memory,
            "replay_matches": all(w["labels_match"] for w in every), "windows_used": len(kept)}


def measure(plan: Plan, bench: Bench) -> dict[str, Any]:
    """Train `plan`, measure it and (N GPUs) resume it; a failed run is recorded, not fatal."""
    row: dict[str, Any] = {**asdict(plan), "global_batch": bench.micro * plan.accumulation * plan.world}
    run_dir = bench.out / plan.name
    try:
        run(plan, bench, run_dir)
        row["losses"] = [(r["step"], r["loss"]) for r in logged(run_dir)]
        row |= throughput(run_dir, bench, plan.world)
        if plan.world > 1 and bench.mid:
            resumed = cut_back(run_dir, bench.out / f"{plan.name}-resumed", bench.mid)
            run(plan, bench, resumed, resume="auto")
            row["resume"] = {"from_step": bench.mid, "adapter": adapter_gap(run_dir, resumed),
                             "loss": loss_gap(logged(run_dir), logged(resumed), after=bench.mid)}
    except (subprocess.CalledProcessError, BenchmarkError, OSError, ValueError) as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def against_one_gpu(runs: dict[str, dict[str, Any]], out: Path) -> None:
    """Each N-GPU run's losses, adapter and tokens/s against the 1-GPU run (this invocation's, or
    the one an earlier invocation left in OUT/1gpu: `--only fsdp2` compares too)."""
    base = out / "1gpu"
    if not (base / "adapter").is_dir():
        return
    one = runs.get("1gpu", {}).get("input_tokens_per_s")
    for name, row in runs.items():
        if name == "1gpu" or "error" in row:
            continue
        row["vs_1gpu"] = {"loss": loss_gap(logged(base), logged(out / name)),
                          "adapter": adapter_gap(base, out / name)}
        if one:
            row["scaling_efficiency"] = row["input_tokens_per_s"] / (row["world"] * one)


# ---------------------------------------------------------------------------- the report


def _num(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _gap(gap: dict[str, Any], key: str) -> str:
    return _num(gap.get(key), ".2e") + ("" if gap.get("ok", True) else " ✗")


COLUMNS = ("run", "GPUs", "micro × accum × GPUs", "tokens/s", "tokens/s per GPU", "scaling", "step ms",
           "MFU per GPU", "peak GiB per GPU", "rel Δloss vs 1 GPU", "Δadapter vs 1 GPU",
           "resumed: rel Δloss", "resumed: Δadapter")


def table(report: dict[str, Any]) -> str:
    """Markdown: a row per run (Δ: the largest absolute difference), then the losses step by step."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for name, r in report["runs"].items():
        cells = [name, str(r["world"]), f"{report['micro_batch']} × {r['accumulation']} × {r['world']}"]
        if "error" in r:
            cells += [f"failed: {r['error'][:160]}"] + [""] * (len(COLUMNS) - 4)
        else:
            vs, res = r.get("vs_1gpu", {}), r.get("resume", {})
            cells += [f"{r['input_tokens_per_s']:,.0f}", f"{r['tokens_per_s_per_gpu']:,.0f}",
                      _num(r.get("scaling_efficiency"), ".0%"), f"{r['step_ms']:.1f}",
                      f"{r['mfu_per_gpu']:.1%}",
                      _num(r["peak_memory_gib"], ".2f"), _gap(vs.get("loss", {}), "max_rel"),
                      _num(vs.get("adapter", {}).get("max_abs"), ".2e"), _gap(res.get("loss", {}), "max_rel"),
                      _num(res.get("adapter", {}).get("max_abs"), ".2e")]
        lines.append("| " + " | ".join(cells) + " |")
    runs = {name: dict(r["losses"]) for name, r in report["runs"].items() if "losses" in r}
    lines += ["", "| step | " + " | ".join(runs) + " |", "|---:|" + "---:|" * len(runs)]
    for s in sorted({s for losses in runs.values() for s in losses}):
        lines.append(f"| {s} | " + " | ".join(_num(runs[n].get(s), ".4f") for n in runs) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- workloads


def shape_workload(args: argparse.Namespace, out: Path, device: str) -> tuple[Path, list[str], Path]:
    """recipes/gpu/llama-1b-shape.yaml on benchmarks.e2e's model and data: (recipe, overrides, model)."""
    shape = "tiny" if args.smoke else "llama-1b"
    model = e2e.write_model(shape, out / "models" / shape, device)
    rows = max(64, 6 * e2e.MICRO_BATCH * args.max_steps * 4)  # ~1 epoch of packed rows at 4 GPUs
    length = 512 if args.smoke else 1024  # the smoke's: e2e's (the Alpaca template is ~90 tokens)
    data = e2e.write_data(out / "data" / "synthetic.jsonl", rows, length)
    overrides = e2e.run_overrides(model, data, True, args.max_steps, length, None)
    return e2e.RECIPES[shape], [*overrides, "adapter.lora_dropout=0.0"], model


def small_workload(args: argparse.Namespace, out: Path, device: str) -> tuple[Path, list[str], Path]:
    """The small random model on the demo mixture (SMALL_RECIPE): (recipe, overrides, model)."""
    model = out / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model, hidden_size=1024, num_layers=8, embedding_std=0.1)
    sources = yaml.safe_load((ROOT / "recipes/demo.yaml").read_text())["data"]["datasets"]
    sources = [{**s, "path": str(ROOT / s["path"]), "val_size": 16} for s in sources]
    recipe = out / "small.yaml"
    recipe.write_text(SMALL_RECIPE.format(model=model.resolve(), datasets=json.dumps(sources)))
    return recipe, [f"train.max_steps={args.max_steps}"] if args.max_steps else [], model


def resume_step(recipe: Any) -> int:
    """Where the resume check restarts: the last logged step at or before the middle (a logging
    window that spanned the restart would average only the steps after it)."""
    every = recipe.output.logging_steps
    mid = recipe.train.max_steps // 2 // every * every
    if mid < 1:
        raise BenchmarkError(f"train.max_steps {recipe.train.max_steps} leaves no logged step before the "
                             f"middle (logging every {every}): raise --max-steps or lower --logging-steps")
    return mid


# ---------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.multi_gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("shape", "small"), default="shape",
                    help="shape: recipes/gpu/llama-1b-shape.yaml; small: a hidden-1024 model, demo mixture")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all); N = 2, and 4 if >= 4")
    ap.add_argument("--only", default=None, help="comma-separated run names, e.g. 1gpu,ddp2 (default: all)")
    ap.add_argument("--max-steps", type=int, default=None, help="train.max_steps (shape: 30; small: 20)")
    ap.add_argument("--logging-steps", type=int, default=None,
                    help="output.logging_steps (default: the recipe's); each log line waits for the GPU")
    ap.add_argument("--warmup-steps", type=int, default=e2e.WARMUP_STEPS,
                    help="logging windows holding any of the first N steps are left out of the speed")
    ap.add_argument("--no-resume", action="store_true", help="skip the checkpoint + --resume auto check")
    ap.add_argument("--out", default="runs/multi_gpu", help="models, data, runs and the report go here")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: the tiny shape, 4 steps, 1 process and DDP over 2 gloo processes "
                         "(no FSDP2: Accelerate shards on GPUs only)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.mode, args.gpus, args.logging_steps, args.warmup_steps = "shape", 2, 1, 1
        args.max_steps = args.max_steps or 4
    if args.mode == "shape":
        args.max_steps = args.max_steps or 30
    if args.max_steps is not None and args.max_steps < 2:
        ap.error("--max-steps must be at least 2 (the resume check restarts from the middle)")
    if args.gpus is not None and args.gpus < 2:
        ap.error("--gpus must be at least 2: the benchmark compares 1 GPU with several")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    from rlora_cli.recipe.load import load_recipe

    args = parse(argv)
    out, cpu, device = Path(args.out), args.smoke, "cpu" if args.smoke else "cuda"
    if not cpu and not torch.cuda.is_available():
        raise BenchmarkError("no CUDA device: --smoke checks the pipeline on the CPU")
    out.mkdir(parents=True, exist_ok=True)
    recipe, overrides, model = (small_workload if args.mode == "small" else shape_workload)(args, out, device)
    overrides += [f"output.logging_steps={args.logging_steps}"] if args.logging_steps else []
    overrides += ["train.compile=false"] if cpu else []  # compiling on a few CPU cores takes minutes
    resolved = load_recipe(recipe, overrides)
    mid = resume_step(resolved)
    overrides += [f"output.save_steps={mid}", "output.save_total_limit=0"]
    every = plans(args.gpus or torch.cuda.device_count(), resolved.train.gradient_accumulation_steps, not cpu)
    todo = [p for p in every if not args.only or p.name in args.only.split(",")]
    if args.only and {p.name for p in todo} != set(args.only.split(",")):
        raise BenchmarkError(f"--only {args.only}: the runs here are {', '.join(p.name for p in every)}")
    peak = e2e.measure_peak(device)
    # Every run's steps train on the same rows: the 1-GPU run's, replayed as train.py draws them.
    steps = e2e.replay(recipe, [*overrides, f"train.gradient_accumulation_steps={every[0].accumulation}"])
    bench = Bench(out, recipe, overrides, cpu, 0 if args.no_resume else mid, resolved.train.micro_batch_size,
                  args.warmup_steps, peak["tflops"], AutoConfig.from_pretrained(model), steps)
    argv = sys.argv[1:] if argv is None else argv
    report = {"command": [sys.executable, "-m", "benchmarks.multi_gpu", *argv],
              "environment": environment(device), "gpus": torch.cuda.device_count(), "mode": args.mode,
              "peak_tflops": peak["tflops"], "peak_how": peak["how"], "recipe": str(recipe),
              "overrides": overrides, "micro_batch": bench.micro, "resume_from_step": bench.mid,
              "loss_rtol": LOSS_RTOL, "runs": {}}
    for plan in todo:
        report["runs"][plan.name] = measure(plan, bench)
        against_one_gpu(report["runs"], out)
        write_json(out / "multi_gpu.json", report)
    text = table(report)
    (out / "multi_gpu.md").write_text(text + "\n")
    print(text + f"\nwritten: {out / 'multi_gpu.json'}, {out / 'multi_gpu.md'}")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # one process of a run (command() launches this)
        worker(sys.argv[2:])
    else:
        try:
            main()
        except BenchmarkError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
