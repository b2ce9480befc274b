"""Same recipe, same global batch, on 1 GPU and on 2 (DDP and FSDP): do the losses agree?

    python -m benchmarks.multi_gpu --out runs/multi_gpu        # on a machine with 2 GPUs

Builds a random Llama-style model (hidden 1024, 8 layers, the offline byte-level tokenizer) and
trains the demo mixture for 20 steps with dropout off (dropout masks differ per process, which
would hide everything else): 1 GPU with micro-batch 8 × accumulation 2, then 2 GPUs with
micro-batch 8 × 1 under DDP and under FSDP. The token-normalised loss makes the three runs the
same computation up to bf16 rounding. Prints the per-step losses, their largest difference and
the throughput, and writes everything to OUT/multi_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import write_json
from rlora_cli.runs import read_metrics

RECIPE = """
seed: 0
model: {{name_or_path: {model}, dtype: auto}}
adapter: {{type: rlora, r: 8, num_heads: 4, lora_dropout: 0.0, target_modules: all-linear}}
data:
  max_length: 256
  datasets: {datasets}
train: {{max_steps: 20, micro_batch_size: 8, gradient_accumulation_steps: {accum}, learning_rate: 1.0e-3,
        warmup_ratio: 0.1, precision: bf16, kernels: none}}
output: {{save_steps: 10, logging_steps: 1}}
"""


def run(name: str, out: Path, model: Path, accum: int, launch: list[str]) -> dict:
    import yaml

    sources = yaml.safe_load(Path("recipes/demo.yaml").read_text())["data"]["datasets"]  # the demo mixture
    sources = [{**s, "val_size": 16} for s in sources]
    recipe = out / f"{name}.yaml"
    recipe.write_text(RECIPE.format(model=model, accum=accum, datasets=json.dumps(sources)))
    cmd = [*launch, "-m", "rlora_cli", "train", str(recipe), "--output", str(out / name), "--overwrite"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = read_metrics(out / name / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    adapter = out / name / "adapter" / "rlora_adapter.safetensors"
    return {"loss": [r["loss"] for r in steps], "tokens_per_s": [r["tokens_per_s"] for r in steps],
            "eval_loss": next((r["eval_loss"] for r in rows if "eval_loss" in r), None),
            "adapter_bytes": adapter.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/multi_gpu")
    ap.add_argument("--only", default=None, choices=("1gpu", "ddp2", "fsdp2"), help="run one of them")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from rlora_cli.testing import build_tiny_model

    model = out / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model, hidden_size=1024, num_layers=8, embedding_std=0.1)
    py = [sys.executable]
    acc = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    plans = {
        "1gpu": (2, py),
        "ddp2": (1, [*acc, "--multi_gpu"]),
        "fsdp2": (1, [sys.executable, "-m", "accelerate.commands.launch",
                      "--config_file", "configs/accelerate/fsdp.yaml"]),
    }
    if args.only:
        print(json.dumps(run(args.only, out, model, *plans[args.only])))
        return
    results = {name: run(name, out, model, *plan) for name, plan in plans.items()}
    base = results["1gpu"]["loss"]
    print(f"{'step':>4} " + " ".join(f"{k:>10}" for k in results))
    for i in range(len(base)):
        print(f"{i + 1:>4} " + " ".join(f"{results[k]['loss'][i]:10.5f}" for k in results))
    for k in ("ddp2", "fsdp2"):
        diff = max(abs(a - b) for a, b in zip(base, results[k]["loss"]))
        rel = max(abs(a - b) / abs(b) for a, b in zip(base, results[k]["loss"]))
        speed = statistics.median_high(results[k]["tokens_per_s"][5:])
        speed1 = statistics.median_high(results["1gpu"]["tokens_per_s"][5:])
        results[k]["max_abs_loss_diff"], results[k]["max_rel_loss_diff"] = diff, rel
        results[k]["speedup_vs_1gpu"] = speed / speed1
        print(f"{k}: max |Δloss| {diff:.2e} (rel {rel:.2e}); median tokens/s {speed:.0f} vs 1 GPU "
              f"{speed1:.0f} → {speed / speed1:.2f}×; adapter file {results[k]['adapter_bytes']} bytes "
              f"(1 GPU: {results['1gpu']['adapter_bytes']})")
    write_json(out / "multi_gpu.json", results)


if __name__ == "__main__":
    main()
